"""The pre-flight planner: exact parameter counts, peak memory by part, micro-batch, duration per GPU class.

Torch-free: the API plans every job with it. `make_plan` is the entry point; docs/planning.md is the rule.
"""

from core.planning.compute import GpuClass, cpu_class, default_gpu_classes, flops_per_token, parse_gpu_classes
from core.planning.memory import MemoryBreakdown, TrainingSetup, estimate_memory
from core.planning.params import ModelShape, UnsupportedModel, adapter_counts, model_shape
from core.planning.plan import PLAN_OBJECT, ClassPlan, Plan, make_plan

__all__ = [
    "PLAN_OBJECT", "ClassPlan", "GpuClass", "MemoryBreakdown", "ModelShape", "Plan", "TrainingSetup",
    "UnsupportedModel", "adapter_counts", "cpu_class", "default_gpu_classes", "estimate_memory", "flops_per_token",
    "make_plan", "model_shape", "parse_gpu_classes",
]
