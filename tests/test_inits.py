"""Every init's new rows on hand-written tensors: plain tables, an untied output layer, TP-split tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_vocab_ext.checkpoint import Checkpoint
from nemo_vocab_ext.core.dtypes import BY_NAME
from nemo_vocab_ext.core.resize import init_rows, resize_table
from nemo_vocab_ext.core.rows import INIT_DESCRIPTIONS, Init, plan_rows
from nemo_vocab_ext.entries import torch_as_array
from nemo_vocab_ext.init_costs import expected_cost
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


def test_every_init_has_a_description_and_a_measured_cost() -> None:
    assert set(INIT_DESCRIPTIONS) == set(Init)
    for init in Init:  # the packaged measurement covers every init (tests/test_quality_tool.py: its numbers)
        assert expected_cost(init).startswith("measured on ") and "nats of base-language loss" in expected_cost(init)


def test_zeros_and_mean() -> None:
    assert torch.equal(OLD[:4].mean(0), OLD_MEAN)
    assert torch.equal(_new_rows(Init.ZEROS), torch.zeros(3, 2))
    assert torch.equal(_new_rows(Init.MEAN), OLD_MEAN.expand(3, -1))


def test_fvt_rows_are_piece_means() -> None:
    assert torch.equal(_new_rows(Init.FVT), FVT)


def _is_sample_of(rows: torch.Tensor, real: torch.Tensor) -> bool:
    """Whether ``rows`` look drawn from N(mean, cov) of ``real``: mean within 5 standard errors, covariance
    within 15%. For the few thousand rows drawn here both bounds are several times the sampling noise and
    a fraction of the differences between the tables these tests compare."""
    rows64, real64 = rows.double().numpy(), real.double().numpy()
    cov = np.cov(real64.T)
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
    # Each table's new rows are its own init; the output layer's are the affine image of the embedding's.
    if init is Init.NORMAL:  # a sample: its own mean and spread, not the embedding's
        assert not torch.equal(out[4:7], emb[4:7] * -2 + 1)
    else:
        assert torch.equal(emb[4:7], _new_rows(init))
        assert torch.equal(out[4:7], _new_rows(init, table=out_layer))
        if init is not Init.ZEROS:  # zeros is the one init that is not affine-equivariant
            assert torch.equal(out[4:7], emb[4:7] * -2 + 1)
    assert torch.equal(out[7], out_layer[:4].mean(0))


def test_untied_normal_samples_each_table_around_its_own_statistics() -> None:
    out_layer = OLD * -2 + 1  # mean [-7, -11], covariance 4x the embedding's
    ckpt = Checkpoint({EMB: OLD.clone(), OUT: out_layer.clone()}, {}, "distributed")
    plan = plan_resize(ckpt, 4, 3004, tensor_parallel=1, divisible_by=4, init=Init.NORMAL, padding_init=Init.MEAN)
    grown, _ = apply_resize(ckpt, plan, seed=5)
    emb, out = grown.tensors[EMB], grown.tensors[OUT]
    assert isinstance(emb, torch.Tensor) and isinstance(out, torch.Tensor)
    assert _is_sample_of(emb[4:3004], OLD[:4]) and not _is_sample_of(emb[4:3004], out_layer[:4])
    assert _is_sample_of(out[4:3004], out_layer[:4]) and not _is_sample_of(out[4:3004], OLD[:4])


# Six old tokens over two TP ranks (rows 0-3 on rank 0; rows 4-5 and two trained padding rows on
# rank 1). Global mean [6, 6]; rank 0's slice alone would give [4, 6]. Grown to 9 tokens in 12 rows.
OLD6 = torch.tensor([[0.0, 8.0], [4.0, 0.0], [8.0, 4.0], [4.0, 12.0], [10.0, 0.0], [10.0, 12.0]])
PIECES6 = [[0, 5], [4], []]  # piece 5 lives on rank 1: a per-rank lookup could not see it
EXPECTED6 = {
    Init.MEAN: [[6.0, 6.0], [6.0, 6.0], [6.0, 6.0]],
    Init.NORMAL: None,
    Init.FVT: [[5.0, 10.0], [10.0, 0.0], [6.0, 6.0]],
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
    if expected is None:  # normal: see test_tp_split_normal_samples_around_the_global_statistics
        assert not torch.equal(emb[6:9], emb[6:9].roll(1, 0))
    else:
        assert torch.equal(emb[6:9], torch.tensor(expected))
        if not tied:  # the output layer's own statistics: here the affine image of the embedding's
            assert torch.equal(tables[LEGACY_OUT][6:9], torch.tensor(expected) * 3 - 1)


@pytest.mark.parametrize("tied", [True, False])
def test_tp_split_normal_samples_around_the_global_statistics(tied: bool) -> None:
    # Rank 0's real rows alone have mean [4, 6] and a 33% smaller x-variance; rank 1's mean [10, 6].
    ckpt, full, full_out = _tp_checkpoint(tied)
    plan = plan_resize(ckpt, 6, 3006, tensor_parallel=2, divisible_by=2, init=Init.NORMAL, padding_init=Init.MEAN)
    grown, _ = apply_resize(ckpt, plan, seed=1)
    assert grown.rank_tensors is not None
    for key, source in ((LEGACY_EMB, full), (LEGACY_OUT, full_out)):
        if tied and key == LEGACY_OUT:
            continue
        new = torch.cat([grown.rank_tensors[(tp, 0)][key] for tp in range(2)])[6:3006]
        assert _is_sample_of(new, source[:6])
        assert not _is_sample_of(new, source[:4]) and not _is_sample_of(new, source[4:6])  # one rank's rows


def test_integer_like_rows_survive_in_bf16() -> None:
    # The float64 statistics are cast once: exact for these values in bfloat16 too.
    bits = torch_as_array(OLD.bfloat16())
    out, _ = resize_table(
        bits, plan_rows(4, 5, 7, 8), Init.FVT, dtype=BY_NAME["bfloat16"], padding_init=Init.MEAN, pieces=PIECES
    )
    assert np.array_equal(out[:4], bits[:4])
    assert torch.equal(torch.from_numpy(out[4:7].view(np.int16)).view(torch.bfloat16).float(), FVT)
