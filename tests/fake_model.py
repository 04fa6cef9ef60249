"""A stand-in for a converted model, for the tests of the converter's destination handling: light
to import, so that the kill -9 tests' subprocesses start fast."""

import json
from pathlib import Path


def fake_model(marker: str):
    """A writer for write_atomically: a converted model's files, each holding MARKER."""

    def write(d: Path):
        (d / "config.json").write_text(json.dumps({"model_type": "fastvlm", "text_config": {},
                                                   "marker": marker}))
        (d / "model.safetensors").write_text(marker * 1000)
        (d / "tokenizer.json").write_text(marker)

    return write


def marker_of(d: Path) -> str:
    """The marker of the complete model in D (the test fails if it is absent or partial)."""
    marker = json.loads((d / "config.json").read_text())["marker"]
    assert (d / "model.safetensors").read_text() == marker * 1000 and (d / "tokenizer.json").read_text() == marker
    return marker
