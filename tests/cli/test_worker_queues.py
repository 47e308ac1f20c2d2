"""`lorajobs worker --queues gpu` on a CUDA machine serves the GPU class its card holds."""

import pytest

from cli.service import worker_queues
from core.settings import Settings

CLASSES = Settings(gpu_classes="gpu-24g,gpu-48g,gpu-80g,gpu-141g")


@pytest.mark.parametrize(("settings", "requested", "memory", "queues"), [
    (CLASSES, "gpu", 23.6, "gpu-24g"),  # an L4 / 4090
    (CLASSES, "cpu,gpu", 79.6, "cpu,gpu-80g"),  # an H100 80GB
    (CLASSES, "gpu", 140.4, "gpu-141g"),  # an H200
    (CLASSES, "gpu", 15.7, "gpu"),  # below every class: kept, with a warning
    (CLASSES, "gpu", None, "gpu"),  # no CUDA: the CPU trains on the gpu queue
    (CLASSES, "gpu-80g", 140.4, "gpu-80g"),  # an explicit class is kept
    (Settings(gpu_classes=""), "gpu", 79.6, "gpu"),  # no classes configured: no routing
])
def test_a_gpu_worker_serves_its_card_s_class(settings, requested, memory, queues):
    assert worker_queues(requested, settings, memory) == queues
