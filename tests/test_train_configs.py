"""The shipped training configs: each loads, and each stage starts from the export of a stage before it, so
the README's reproduction chain runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from timjax.train.sft import DataSpec, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "timjax" / "train" / "configs").glob("*.json"))
EXPORTS = {str(Path(load_config(p).out_dir) / "hf"): p for p in CONFIGS}  # what each stage writes


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_starts_from_an_earlier_stage(path):
    cfg = load_config(path)
    if cfg.init_from is not None:
        assert cfg.init_from in EXPORTS, f"{path.name}: init_from {cfg.init_from} is no shipped stage's export"
        assert EXPORTS[cfg.init_from] != path


def test_no_stage_overwrites_another():
    assert len(EXPORTS) == len(CONFIGS)


def test_restated_operands_are_a_config_field_that_defaults_off():
    assert DataSpec().restate_operands is False  # stages 1-5 were trained on the plain format
    assert load_config(CONFIGS[0].parent / "tiny_tim_stage6.json").data.restate_operands is True


def test_chunk_terms_reach_the_document_format_and_default_off():
    from timjax.train.corpus import DocFormat
    from timjax.train.sft import doc_format

    assert doc_format(DataSpec()) == DocFormat()
    assert doc_format(DataSpec(rewrite_operations=True, chunk_terms=4)) == DocFormat(rewrite=True, chunk_terms=4)
