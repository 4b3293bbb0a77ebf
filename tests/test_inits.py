"""Every init's new rows on hand-written tensors: plain tables, an untied output layer, TP-split tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import english_texts, invoke_cli
from omegaconf import OmegaConf
from test_cli import make_nemo

from nemo_vocab_ext.checkpoint import Checkpoint
from nemo_vocab_ext.core.dtypes import BY_NAME
from nemo_vocab_ext.core.resize import init_rows, resize_table
from nemo_vocab_ext.core.rows import INIT_DESCRIPTIONS, Init, plan_rows
from nemo_vocab_ext.entries import torch_as_array
from nemo_vocab_ext.init_costs import expected_cost, measured
from nemo_vocab_ext.io import load_checkpoint
from nemo_vocab_ext.nemo_plugin import ExtensionSettings
from nemo_vocab_ext.tokenization.train import train_bpe
from nemo_vocab_ext.vocab import apply_resize, plan_resize

EMB = "model.embedding.word_embeddings.weight"
OUT = "model.output_layer.weight"
LEGACY_EMB = "model.language_model.embedding.word_embeddings.weight"
LEGACY_OUT = "model.language_model.output_layer.weight"

# Four old tokens (rows 0-3), a trained padding row (4) that no statistic may read.
OLD = torch.tensor([[0.0, 8.0], [4.0, 0.0], [8.0, 4.0], [4.0, 12.0], [1000.0, -1000.0]])
OLD_MEAN = torch.tensor([4.0, 6.0])
# New tokens 4, 5, 6 under the old tokenizer: pieces [0, 2], [3], and none (falls back to the mean).
PIECES = [[0, 2], [3], []]
FVT = torch.tensor([[4.0, 6.0], [4.0, 12.0], [4.0, 6.0]])
SAMPLED = (Init.NORMAL, Init.HF_MEAN_RESIZING)  # inits that draw their rows


def _fvt_norm(real: torch.Tensor, fvt_rows: torch.Tensor) -> torch.Tensor:
    """fvt-norm by its definition, in float64: fvt's rows rescaled to the median L2 norm of the old real rows."""
    rows = fvt_rows.double()
    median = torch.quantile(real.double().norm(dim=1), 0.5)  # of an even count: the midpoint of the middle two
    return (rows * median / rows.norm(dim=1, keepdim=True)).float()


F32 = BY_NAME["float32"]


def _new_rows(init: Init, table: torch.Tensor = OLD, pieces: list[list[int]] | None = PIECES) -> torch.Tensor:
    plan = plan_rows(4, table.shape[0], 7, 8)
    out, _ = resize_table(
        torch_as_array(table),
        plan,
        init,
        dtype=F32,
        padding_init=Init.MEAN,
        pieces=pieces if init.needs_pieces else None,
    )
    rows = torch.from_numpy(out)
    assert torch.equal(rows[:4], table[:4])  # old rows bit-exact whatever the init
    assert torch.equal(rows[7], table[:4].mean(0))  # padding: the mean of the old real rows
    return rows[4:7]


def test_every_init_has_a_description_and_a_cost_line() -> None:
    assert set(INIT_DESCRIPTIONS) == set(Init)
    ckpt = Checkpoint({EMB: OLD.clone()}, {}, "distributed")
    for init in Init:  # tests/test_quality_tool.py checks the measured numbers
        cost = expected_cost(init)
        if str(init) in measured()["inits"]:
            assert cost.startswith("measured on ") and "nats of base-language loss" in cost
        else:
            assert cost.startswith(f"not measured yet ({', '.join(measured()['inits'])} were, measured on ")
        lines = plan_resize(ckpt, 4, 7, tensor_parallel=1, divisible_by=4, init=init, padding_init=Init.MEAN).lines()
        assert f"expected cost of '{init}': {cost}" in lines


def test_an_init_without_measurements_is_reported_as_not_measured_yet() -> None:
    result = {**measured(), "inits": {k: v for k, v in measured()["inits"].items() if k != "fvt"}}
    assert expected_cost(Init.FVT, result).startswith(
        f"not measured yet ({', '.join(result['inits'])} were, measured on "
    )
    assert "fvt," not in ", ".join(result["inits"]) + ","
    assert expected_cost(Init.MEAN, result).startswith("measured on ")


def test_zeros_and_mean() -> None:
    assert torch.equal(OLD[:4].mean(0), OLD_MEAN)
    assert torch.equal(_new_rows(Init.ZEROS), torch.zeros(3, 2))
    assert torch.equal(_new_rows(Init.MEAN), OLD_MEAN.expand(3, -1))


def test_fvt_rows_are_piece_means() -> None:
    assert torch.equal(_new_rows(Init.FVT), FVT)


def test_fvt_norm_rows_are_fvt_rows_at_the_median_norm_of_the_old_rows() -> None:
    # Old real norms 8, 4, sqrt(80), sqrt(160): the median is the midpoint of 8 and sqrt(80).
    expected = _fvt_norm(OLD[:4], FVT)
    assert torch.allclose(expected.norm(dim=1).double(), torch.tensor((8 + 80**0.5) / 2, dtype=torch.float64))
    torch.testing.assert_close(_new_rows(Init.FVT_NORM), expected, rtol=1e-6, atol=0)


# Old real norms 5, 5, 5, 10, 20: median 5, mean 9 (a mean would give rows of norm 9). Mean row [0, 6.6].
NORM_OLD = torch.tensor([[3.0, 4.0], [4.0, 3.0], [-3.0, 4.0], [8.0, 6.0], [-12.0, 16.0], [900.0, 0.0]])
NORM_PIECES = [[3], [2, 4], []]  # [8, 6]; mean [-7.5, 10]; none: the mean row
NORM_EXPECTED = torch.tensor([[4.0, 3.0], [-3.0, 4.0], [0.0, 5.0]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fvt_norm_on_hand_written_rows(dtype: str) -> None:
    # Row 5 is trained padding (norm 900): it would move the median if it were read. Exact in bfloat16 too.
    table = NORM_OLD.to(getattr(torch, dtype))
    out, stats = resize_table(
        torch_as_array(table),
        plan_rows(5, 6, 8, 8),
        Init.FVT_NORM,
        dtype=BY_NAME[dtype],
        padding_init=Init.MEAN,
        pieces=NORM_PIECES,
    )
    rows = torch.from_numpy(out[5:8])
    if dtype == "bfloat16":
        rows = rows.view(torch.bfloat16)
    assert torch.equal(rows.float(), NORM_EXPECTED) and stats.fvt_fallbacks == 1


def test_fvt_norm_leaves_a_zero_row_zero() -> None:
    # A zero row has no direction to rescale; the other rows' median norm is 5.
    old = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=np.float32)
    out = np.empty((2, 2), dtype=np.float32)
    init_rows(old, out, Init.FVT_NORM, dtype=F32, pieces=[[0], [2]])
    assert np.array_equal(out, [[0.0, 0.0], [3.0, 4.0]])


def _covariance(real: np.ndarray, init: Init) -> np.ndarray:
    """The covariance ``init`` samples with: normal's unbiased one; transformers' mean_resizing: 1e-9 x the
    biased one (as ``modeling_utils._init_added_embeddings_weights_with_mean`` computes it)."""
    if init is Init.HF_MEAN_RESIZING:
        return 1e-9 * np.cov(real.T, bias=True)
    return np.cov(real.T)


def _is_sample_of(rows: torch.Tensor, real: torch.Tensor, init: Init = Init.NORMAL) -> bool:
    """Whether ``rows`` look drawn from N(mean, cov) of ``real`` as ``init`` defines them: mean within 5
    standard errors, covariance within 15%. For the few thousand rows drawn here both bounds are several
    times the sampling noise and a fraction of the differences between the tables these tests compare."""
    rows64, real64 = rows.double().numpy(), real.double().numpy()
    cov = _covariance(real64, init)
    mean_ok = np.all(np.abs(rows64.mean(0) - real64.mean(0)) <= 5 * np.sqrt(cov.diagonal() / rows64.shape[0]))
    return bool(mean_ok and np.allclose(np.cov(rows64.T), cov, rtol=0.15, atol=0.05 * cov.diagonal().max()))


def test_normal_is_a_seeded_sample_around_the_old_rows() -> None:
    old = torch_as_array(OLD[:4])
    f64 = BY_NAME["float64"]
    a, b = np.empty((2000, old.shape[1])), np.empty((2000, old.shape[1]))
    init_rows(old, a, Init.NORMAL, dtype=f64, rng=np.random.default_rng(3))
    init_rows(old, b, Init.NORMAL, dtype=f64, rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert np.allclose(a.mean(0), OLD_MEAN.numpy(), atol=0.4)
    assert np.allclose(np.cov(a.T), np.cov(old.astype(np.float64).T), rtol=0.15, atol=0.5)


@pytest.mark.parametrize("init", [i for i in Init if i.needs_pieces])
def test_piece_inits_need_pieces_and_padding_cannot_use_them(init: Init) -> None:
    with pytest.raises(ValueError, match="pieces"):
        resize_table(torch_as_array(OLD), plan_rows(4, 5, 7, 8), init, dtype=F32, padding_init=Init.MEAN)
    with pytest.raises(ValueError, match="padding"):
        resize_table(torch_as_array(OLD), plan_rows(4, 5, 7, 8), Init.MEAN, dtype=F32, padding_init=init)


@pytest.mark.parametrize("init", list(Init))
def test_untied_output_layer_uses_its_own_rows(init: Init) -> None:
    out_layer = OLD * -2 + 1  # different statistics from the embedding's
    ckpt = Checkpoint({EMB: OLD.clone(), OUT: out_layer.clone()}, {}, "distributed")
    plan = plan_resize(ckpt, 4, 7, tensor_parallel=1, divisible_by=4, init=init, padding_init=Init.MEAN)
    assert not plan.tied and plan.rows.new_rows == 8
    grown, done = apply_resize(ckpt, plan, pieces=PIECES if init.needs_pieces else None, seed=5)
    assert [d.key for d in done] == [EMB, OUT]
    emb, out = grown.tensors[EMB], grown.tensors[OUT]
    assert isinstance(emb, torch.Tensor) and isinstance(out, torch.Tensor)
    assert torch.equal(emb[:4], OLD[:4]) and torch.equal(out[:4], out_layer[:4])
    # Each table's new rows are its own init; mean's and fvt's are the affine image of the embedding's.
    if init in SAMPLED:  # a sample: its own mean and spread, not the embedding's
        assert not torch.equal(out[4:7], emb[4:7] * -2 + 1)
        if init is Init.HF_MEAN_RESIZING:  # within a hair of each table's own mean
            assert torch.allclose(emb[4:7], OLD_MEAN.expand(3, -1), atol=1e-2)
            assert torch.allclose(out[4:7], out_layer[:4].mean(0).expand(3, -1), atol=1e-2)
    else:
        assert torch.equal(emb[4:7], _new_rows(init))
        assert torch.equal(out[4:7], _new_rows(init, table=out_layer))
        if init in (Init.MEAN, Init.FVT):  # zeros and fvt-norm's rescale are not affine-equivariant
            assert torch.equal(out[4:7], emb[4:7] * -2 + 1)
        if init is Init.FVT_NORM:  # the output layer's own median norm
            torch.testing.assert_close(out[4:7], _fvt_norm(out_layer[:4], FVT * -2 + 1), rtol=1e-6, atol=0)
    assert torch.equal(out[7], out_layer[:4].mean(0))


@pytest.mark.parametrize("init", SAMPLED)
def test_untied_samples_each_table_around_its_own_statistics(init: Init) -> None:
    out_layer = OLD * -2 + 1  # mean [-7, -11], covariance 4x the embedding's
    ckpt = Checkpoint({EMB: OLD.clone(), OUT: out_layer.clone()}, {}, "distributed")
    plan = plan_resize(ckpt, 4, 3004, tensor_parallel=1, divisible_by=4, init=init, padding_init=Init.MEAN)
    grown, _ = apply_resize(ckpt, plan, seed=5)
    emb, out = grown.tensors[EMB], grown.tensors[OUT]
    assert isinstance(emb, torch.Tensor) and isinstance(out, torch.Tensor)
    assert _is_sample_of(emb[4:3004], OLD[:4], init) and not _is_sample_of(emb[4:3004], out_layer[:4], init)
    assert _is_sample_of(out[4:3004], out_layer[:4], init) and not _is_sample_of(out[4:3004], OLD[:4], init)


def _drawn(init: Init, old: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` float32 rows drawn by ``init`` from ``old``."""
    out = np.empty((count, old.shape[1]), dtype=np.float32)
    init_rows(torch_as_array(old), out, init, dtype=F32, rng=np.random.default_rng(seed))
    return torch.from_numpy(out)


def test_hf_mean_draws_as_transformers_mean_resizing_does() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    # transformers itself, on the same four rows: GPT-2's embedding, grown by 3000 tokens.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_embd=2, n_layer=1, n_head=1, n_positions=4))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(OLD[:4])
    model.resize_token_embeddings(3004, mean_resizing=True)
    theirs = model.get_input_embeddings().weight.detach()[4:]
    ours = _drawn(Init.HF_MEAN_RESIZING, OLD[:4], 3000)
    # Its definition: N(mean, 1e-9 x the covariance divided by the row count): [[8, -4], [-4, 20]] x 1e-9.
    assert np.allclose(_covariance(OLD[:4].double().numpy(), Init.HF_MEAN_RESIZING), [[8e-9, -4e-9], [-4e-9, 20e-9]])
    assert _is_sample_of(theirs, OLD[:4], Init.HF_MEAN_RESIZING)
    assert _is_sample_of(ours, OLD[:4], Init.HF_MEAN_RESIZING)
    assert not _is_sample_of(_drawn(Init.NORMAL, OLD[:4], 3000), OLD[:4], Init.HF_MEAN_RESIZING)  # normal is not it
    # Seeded by the resize's generator.
    assert torch.equal(ours, _drawn(Init.HF_MEAN_RESIZING, OLD[:4], 3000))
    assert not torch.equal(ours, _drawn(Init.HF_MEAN_RESIZING, OLD[:4], 3000, seed=1))


def test_hf_mean_is_the_mean_when_the_covariance_is_not_positive_definite() -> None:
    # Two rows in two dimensions: their centred rows span one; transformers then writes the mean.
    old = OLD[:2]
    assert torch.equal(_drawn(Init.HF_MEAN_RESIZING, old, 5), old.mean(0).expand(5, -1))


def test_hf_mean_in_bf16_is_the_mean() -> None:
    # Its spread (about 1e-4 here) is far below bfloat16's step near 4 (1/32): every row rounds to the mean.
    bits = torch_as_array(OLD.bfloat16())
    out, _ = resize_table(
        bits, plan_rows(4, 5, 7, 8), Init.HF_MEAN_RESIZING, dtype=BY_NAME["bfloat16"], padding_init=Init.MEAN
    )
    assert torch.equal(torch.from_numpy(out[4:7]).view(torch.bfloat16).float(), OLD_MEAN.expand(3, -1))


# Six old tokens over two TP ranks (rows 0-3 on rank 0; rows 4-5 and two trained padding rows on
# rank 1). Global mean [6, 6]; rank 0's slice alone would give [4, 6]. Grown to 9 tokens in 12 rows.
OLD6 = torch.tensor([[0.0, 8.0], [4.0, 0.0], [8.0, 4.0], [4.0, 12.0], [10.0, 0.0], [10.0, 12.0]])
PIECES6 = [[0, 5], [4], []]  # piece 5 lives on rank 1: a per-rank lookup could not see it
FVT6 = torch.tensor([[5.0, 10.0], [10.0, 0.0], [6.0, 6.0]])
EXPECTED6 = {
    Init.MEAN: torch.tensor([[6.0, 6.0], [6.0, 6.0], [6.0, 6.0]]),
    Init.NORMAL: None,
    Init.HF_MEAN_RESIZING: None,
    Init.FVT: FVT6,
    Init.FVT_NORM: _fvt_norm(OLD6, FVT6),  # global median norm 9.47; rank 0's rows alone: 8.47
}


def _tp_checkpoint(tied: bool) -> tuple[Checkpoint, torch.Tensor, torch.Tensor]:
    """OLD6 and two trained padding rows split over two TP ranks (legacy keys); its full tables."""
    full = torch.cat([OLD6, torch.full((2, 2), 500.0)])
    full_out = full * 3 - 1
    ranks: dict[tuple[int, int], dict] = {}
    for tp in range(2):
        state: dict = {LEGACY_EMB: full.chunk(2)[tp].clone()}
        if not tied:
            state[LEGACY_OUT] = full_out.chunk(2)[tp].clone()
        ranks[(tp, 0)] = state
    return Checkpoint(ranks[(0, 0)], {"tensor_model_parallel_size": 2}, "mp_rank", rank_tensors=ranks), full, full_out


@pytest.mark.parametrize("init", [i for i in Init if i is not Init.ZEROS])
@pytest.mark.parametrize("tied", [True, False])
def test_tp_split_tables_take_statistics_over_the_global_old_rows(init: Init, tied: bool) -> None:
    ckpt, full, full_out = _tp_checkpoint(tied)
    plan = plan_resize(ckpt, 6, 9, tensor_parallel=2, divisible_by=2, init=init, padding_init=Init.MEAN)
    assert plan.rows.new_rows == 12
    grown, _ = apply_resize(ckpt, plan, pieces=PIECES6 if init.needs_pieces else None, seed=1)
    assert grown.rank_tensors is not None
    tables = {}
    for key, source in ((LEGACY_EMB, full), (LEGACY_OUT, full_out)):
        if tied and key == LEGACY_OUT:
            assert LEGACY_OUT not in grown.rank_tensors[(0, 0)]
            continue
        blocks = [grown.rank_tensors[(tp, 0)][key] for tp in range(2)]
        assert [b.shape[0] for b in blocks] == [6, 6]  # re-split: rank 1 now starts at row 6
        table = tables[key] = torch.cat(blocks)
        assert torch.equal(table[:6], source[:6])
        assert torch.equal(table[9:], source[:6].mean(0).expand(3, -1))  # new padding: the global mean
    emb = tables[LEGACY_EMB]
    expected = EXPECTED6[init]
    if expected is None:  # a sample: see test_tp_split_samples_around_the_global_statistics
        assert not torch.equal(emb[6:9], emb[6:9].roll(1, 0))
    elif init is Init.FVT_NORM:
        torch.testing.assert_close(emb[6:9], expected, rtol=1e-6, atol=0)
        assert not torch.allclose(emb[6:9], _fvt_norm(OLD6[:4], FVT6), rtol=1e-3)  # rank 0's median
        if not tied:  # the output layer's own median norm
            own = _fvt_norm(full_out[:6], FVT6 * 3 - 1)
            torch.testing.assert_close(tables[LEGACY_OUT][6:9], own, rtol=1e-6, atol=0)
    else:
        assert torch.equal(emb[6:9], expected)
        if not tied:  # the output layer's own statistics: here the affine image of the embedding's
            assert torch.equal(tables[LEGACY_OUT][6:9], expected * 3 - 1)


@pytest.mark.parametrize("init", SAMPLED)
@pytest.mark.parametrize("tied", [True, False])
def test_tp_split_samples_around_the_global_statistics(tied: bool, init: Init) -> None:
    # Rank 0's real rows alone have mean [4, 6] and a 33% smaller x-variance; rank 1's mean [10, 6].
    ckpt, full, full_out = _tp_checkpoint(tied)
    plan = plan_resize(ckpt, 6, 3006, tensor_parallel=2, divisible_by=2, init=init, padding_init=Init.MEAN)
    grown, _ = apply_resize(ckpt, plan, seed=1)
    assert grown.rank_tensors is not None
    for key, source in ((LEGACY_EMB, full), (LEGACY_OUT, full_out)):
        if tied and key == LEGACY_OUT:
            continue
        new = torch.cat([grown.rank_tensors[(tp, 0)][key] for tp in range(2)])[6:3006]
        assert _is_sample_of(new, source[:6], init)
        assert not _is_sample_of(new, source[:4], init) and not _is_sample_of(new, source[4:6], init)  # one rank's


def test_integer_like_rows_survive_in_bf16() -> None:
    # The float64 statistics are cast once: exact for these values in bfloat16 too.
    bits = torch_as_array(OLD.bfloat16())
    out, _ = resize_table(
        bits, plan_rows(4, 5, 7, 8), Init.FVT, dtype=BY_NAME["bfloat16"], padding_init=Init.MEAN, pieces=PIECES
    )
    assert np.array_equal(out[:4], bits[:4])
    assert torch.equal(torch.from_numpy(out[4:7].view(np.int16)).view(torch.bfloat16).float(), FVT)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: train_bpe(english_texts(), root / name, size) for name, size in (("base", 400), ("large", 600))}


@pytest.mark.parametrize("init", [Init.FVT_NORM, Init.HF_MEAN_RESIZING])
def test_the_cli_and_the_plugin_take_the_anchor_inits(init: Init, bpe: dict[str, Path], tmp_path: Path) -> None:
    # The plugin's `+model.vocab_extension.init=...` value, as Hydra hands it over.
    assert ExtensionSettings.from_config(OmegaConf.create({"init": init.value})).options().init is init
    src = make_nemo(tmp_path / "base.nemo", bpe["base"], tied=False)
    result = invoke_cli("resize", src, tmp_path / "out.nemo", "--tokenizer", bpe["large"], "--init", init.value)
    assert result.exit_code == 0, result.output
    assert f"init '{init}': {INIT_DESCRIPTIONS[init]}" in result.output
    assert f"expected cost of '{init}': {expected_cost(init)}" in result.output
    old, new = load_checkpoint(src)[0].tensors, load_checkpoint(tmp_path / "out.nemo")[0].tensors
    for key in (EMB, OUT):  # tokens 400-599 are new; each table by its own rows
        real, rows = old[key][:400].double(), new[key][400:600].double()
        if init is Init.FVT_NORM:
            median = torch.quantile(real.norm(dim=1), 0.5)
            assert torch.allclose(rows.norm(dim=1), median.expand(200), rtol=1e-5)
        else:
            assert torch.allclose(rows, real.mean(0).expand(200, -1), atol=1e-3)
            assert not torch.equal(rows, rows.roll(1, 0))
