"""Shared fixtures: a tiny random-weight FastVLM in transformers' layout, its tokenizer, and the
same model converted to a fastvlm_mlx directory. Everything is built here: nothing is downloaded."""

import shutil

import numpy as np
import pytest
import torch

import reference as ref


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """(reference model, transformers-layout checkpoint dir, special-token ids).

    The checkpoint's vocabulary is padded past the tokenizer's (512 rows for 400 tokens), as
    Qwen2's releases are; the reference model is then resized to the tokenizer as Apple's
    loader does, so padded ids are never produced. Other layouts are built from the checkpoint
    on disk (`ref.checkpoint_state`), padding included."""
    path = tmp_path_factory.mktemp("tiny_hf")
    ids = ref.write_tokenizer(path)
    model = ref.transformers_vlm(image_token_id=ids[ref.IMAGE])
    model.save_pretrained(str(path))
    ref.save_json(path / "preprocessor_config.json", {"crop_size": {"height": 256, "width": 256}})
    return ref.apple_vocabulary(model, path), path, ids


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`mktemp` for a module's fixtures, whose folders are removed when the module is done.

    A module's checkpoints and conversions come to hundreds of MB, and CI's disk is small: pytest
    removes a passed test's `tmp_path` (pyproject.toml: tmp_path_retention_policy) and the whole
    run's folder after a green run, but not a module fixture's until the run ends."""
    made = []

    def mktemp(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_converted(tiny_source, tmp_path_factory):
    from fastvlm_mlx.convert import convert

    _, src, _ = tiny_source
    return convert(src, tmp_path_factory.mktemp("tiny_mlx") / "model", dtype="float32")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_converted):
    import fastvlm_mlx

    return fastvlm_mlx.load(tiny_converted)


@torch.no_grad()
def reference_logits(model, input_ids, pixels_nchw):
    pv = None if pixels_nchw is None else torch.from_numpy(pixels_nchw)
    return model(input_ids=torch.tensor(input_ids), pixel_values=pv).logits.float().numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
