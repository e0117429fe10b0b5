"""``arrowvision score``, ``classify`` and ``search --text``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

import arrowvision
from arrowvision.cli import main
from arrowvision.model.convert import convert

from .textkit import save_full_checkpoint

SAMPLES = Path(__file__).resolve().parents[1] / "arrowvision" / "samples"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind in ("siglip", "clip"):
        folder = save_full_checkpoint(tmp_path_factory.mktemp(kind), kind, seed=21)
        convert(str(folder), folder / "all.parquet", tower="all", progress=False)
        convert(str(folder), folder / "vision.parquet", tower="vision", progress=False)
        out[kind] = folder
    return out


def write_pairs(folder: Path) -> Path:
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [
        (str(SAMPLES / "chelsea.jpg"), "a photo of a cat"),
        (str(SAMPLES / "astronaut.jpg"), "an astronaut, in space!"),
        ("broken.jpg", "a photo of a cat"),  # relative to the table's folder
        (str(SAMPLES / "coffee.jpg"), "a cup of coffee"),
        (str(folder / "missing.jpg"), "nothing"),
    ]
    path = folder / "pairs.csv"
    path.write_text("image,text\n" + "".join(f'{i},"{t}"\n' for i, t in rows))
    return path


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_score_writes_scores_and_errors(weights, kind, suffix, tmp_path, capsys):
    pairs = write_pairs(tmp_path)
    out = tmp_path / f"scores{suffix}"
    code = main(["score", str(pairs), "--weights", str(weights[kind] / "all.parquet"), "--backend", "torch",
                 "-o", str(out), "--batch-size", "2", "--no-progress"])
    assert code == 3  # finished, two rows failed
    assert "5 pairs: 3 scored, 2 failed" in capsys.readouterr().out
    table = (pq.read_table(out) if suffix == ".parquet" else pa_csv.read_csv(out)).to_pydict()
    assert not table["error"][0] and "broken.jpg" in table["error"][2] and table["clip_score"][2] is None
    assert table["error"][4] and table["logit"][4] is None
    model = arrowvision.ImageTextModel.from_parquet(weights[kind] / "all.parquet")
    good = [0, 1, 3]
    images = [table["image"][i] for i in good]
    texts = [table["text"][i] for i in good]
    np.testing.assert_allclose([table["clip_score"][i] for i in good], model.clip_score(images, texts), atol=1e-3)
    np.testing.assert_allclose([table["logit"][i] for i in good], np.diag(model.logits(images, texts)), atol=1e-4)
    distinct = list(dict.fromkeys(table["text"]))
    probs = model.probabilities(images, distinct)
    expected = [probs[j, distinct.index(t)] for j, t in enumerate(texts)]  # SigLIP: sigmoid; CLIP: over the distinct texts
    np.testing.assert_allclose([table["probability"][i] for i in good], expected, atol=1e-5)


def test_score_needs_image_and_text_columns(weights, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\na.jpg,hello\n")
    assert main(["score", str(bad), "--weights", str(weights["siglip"] / "all.parquet"), "--backend", "torch", "-o", str(tmp_path / "o.csv")]) == 1
    assert "missing column(s) image, text" in capsys.readouterr().err


def test_text_commands_on_a_vision_only_file_say_to_convert_with_tower_all(weights, tmp_path, capsys):
    pairs = write_pairs(tmp_path)
    assert main(["score", str(pairs), "--weights", str(weights["siglip"] / "vision.parquet"), "--backend", "torch", "-o", str(tmp_path / "o.csv")]) == 1
    assert "--tower all" in capsys.readouterr().err


def test_classify_ranks_labels_and_reports_bad_images(weights, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    image = str(SAMPLES / "chelsea.jpg")
    code = main(["classify", image, str(bad), "--labels", "cat, dog,car", "--weights", str(weights["clip"] / "all.parquet"),
                 "--backend", "torch", "--json"])
    assert code == 3
    lines = capsys.readouterr().out.strip().splitlines()
    import json

    first, second = json.loads(lines[0]), json.loads(lines[1])
    model = arrowvision.ImageTextModel.from_parquet(weights["clip"] / "all.parquet")
    expected = model.zero_shot([image], ["cat", "dog", "car"])[0]
    assert [(e["label"], pytest.approx(e["probability"], abs=1e-5)) for e in first["labels"]] == expected
    assert second["image"] == str(bad) and "error" in second


def test_search_by_text_uses_the_same_model_and_refuses_another(weights, tmp_path, capsys):
    all_file = weights["siglip"] / "all.parquet"
    dataset = tmp_path / "emb"
    assert main(["embed", str(SAMPLES), "-o", str(dataset), "--weights", str(all_file), "--backend", "torch", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(dataset), "--text", "a photo of a cat", "--weights", str(all_file), "--backend", "torch", "-k", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == 3
    model = arrowvision.ImageTextModel.from_parquet(all_file)
    scores = model.encode_images(sorted(SAMPLES.glob("*.jpg"))) @ model.encode_texts(["a photo of a cat"])[0]
    assert float(rows[0].split()[1]) == pytest.approx(float(scores.max()), abs=1e-3)

    other = tmp_path / "emb-vision"
    assert main(["embed", str(SAMPLES), "-o", str(other), "--weights", str(weights["siglip"] / "vision.parquet"), "--backend", "torch", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(other), "--text", "a cat", "--weights", str(all_file), "--backend", "torch"]) == 1
    assert "embed the images with the same --tower all weights file" in capsys.readouterr().err
