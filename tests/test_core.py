"""Core arithmetic and row-class resize on hand-written integer tables and meta-device shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_vocab_ext.checkpoint import DISTRIBUTED, Checkpoint
from nemo_vocab_ext.core import resize as core_resize
from nemo_vocab_ext.core.dtypes import BY_NAME, DType, dtype_of
from nemo_vocab_ext.core.keys import UnknownKeysError, find_vocab_keys, normalize_key
from nemo_vocab_ext.core.resize import (
    from_float64,
    join_vocab_shards,
    resize_table,
    rows_after_kept,
    split_vocab_rows,
    widen,
)
from nemo_vocab_ext.core.rows import Init, ShrinkRefusedError, plan_rows
from nemo_vocab_ext.core.sizes import padded_vocab_size, tp_row_range
from nemo_vocab_ext.entries import Deferred, held, torch_as_array
from nemo_vocab_ext.pipeline import resize_while_writing
from nemo_vocab_ext.resize_job import WORDING
from nemo_vocab_ext.vocab import plan_resize, resize_tables, vocab_tables


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"),
    [(50257, 1, 50304), (50257, 2, 50432), (50257, 4, 50688), (50257, 8, 51200), (512, 1, 512), (513, 1, 640)],
)
def test_padded_vocab_size_rounds_up_to_divisible_times_tp(vocab: int, tp: int, padded: int) -> None:
    assert padded_vocab_size(vocab, 128, tp) == padded


def test_padded_vocab_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        padded_vocab_size(0, 128, 1)
    with pytest.raises(ValueError):
        padded_vocab_size(10, 0, 1)


def test_tp_row_ranges_move_when_the_table_grows() -> None:
    assert [tp_row_range(512, 2, r) for r in range(2)] == [(0, 256), (256, 512)]
    assert [tp_row_range(768, 2, r) for r in range(2)] == [(0, 384), (384, 768)]
    with pytest.raises(ValueError):
        tp_row_range(10, 4, 0)


def test_keys_are_matched_exactly_across_spellings() -> None:
    mcore = find_vocab_keys(["model.embedding.word_embeddings.weight", "model.output_layer.weight"])
    assert (mcore.family, mcore.tied) == ("mcore", False)
    o2 = find_vocab_keys(["model.module.embedding.word_embeddings.weight", "model.module.decoder.x"])
    assert o2.embedding == "model.module.embedding.word_embeddings.weight" and o2.tied
    legacy = find_vocab_keys(
        ["model.language_model.embedding.word_embeddings.weight", "model.word_embeddings_for_head.weight"]
    )
    assert legacy.family == "legacy" and legacy.tied_copies == ("model.word_embeddings_for_head.weight",)
    assert normalize_key("model._orig_mod.embedding.word_embeddings.weight") == "model.embedding.word_embeddings.weight"
    # A substring match would take these; exact matching must not.
    with pytest.raises(UnknownKeysError, match="no word-embedding tensor"):
        find_vocab_keys(["model.embedding.word_embeddings.weight_scale", "encoder.word_embeddings.weight"])


F32, BF16 = BY_NAME["float32"], BY_NAME["bfloat16"]


def _table(rows: int, width: int = 2) -> np.ndarray:
    # Row i is [10*i, 10*i + 1, ...]: every row is recognisable.
    return (np.arange(rows)[:, None] * 10 + np.arange(width)).astype(np.float32)


def test_row_classes_copy_drop_init_and_pad() -> None:
    # 5 real tokens padded to 8 rows, grown to 7 tokens padded to 12 rows.
    table = _table(8)
    plan = plan_rows(5, 8, 7, 12)
    out, stats = resize_table(table, plan, Init.ZEROS, dtype=F32, padding_init=Init.MEAN)
    assert out.shape == (12, 2) and out.dtype == np.float32
    assert np.array_equal(out[:5], table[:5])  # old real rows bit-exact
    assert np.array_equal(out[5:7], np.zeros((2, 2)))  # new tokens: zeros, NOT the old padding rows 5..7
    assert np.array_equal(out[7:], np.tile([20.0, 21.0], (5, 1)))  # padding = mean of old REAL rows only
    assert (stats.copied, stats.initialised, stats.padding) == (5, 2, 5)
    classes = [(c.name, c.start, c.stop) for c in plan.classes()]
    assert classes == [
        ("old tokens", 0, 5),
        ("old padding (dropped)", 5, 8),
        ("new tokens", 5, 7),
        ("new padding", 7, 12),
    ]


def test_mean_init_uses_old_real_rows_only() -> None:
    table = _table(4)
    table[3] = 1000.0  # a trained padding row must not leak into the statistics
    out, _ = resize_table(table, plan_rows(3, 4, 5, 6), Init.MEAN, dtype=F32, padding_init=Init.MEAN)
    assert np.array_equal(out[3:], np.tile([10.0, 11.0], (3, 1)))


def test_fvt_is_the_mean_of_piece_rows_with_mean_fallback() -> None:
    table = _table(4)
    pieces = [[0, 2], [3], [], [1, 9], [3, 1, 2]]  # piece 9 is outside the table: falls back too
    out, stats = resize_table(table, plan_rows(4, 4, 9, 10), Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=pieces)
    assert np.array_equal(out[4], [10.0, 11.0])  # mean of rows 0 and 2
    assert np.array_equal(out[5], table[3])
    assert np.array_equal(out[6], [15.0, 16.0]) and np.array_equal(out[7], [15.0, 16.0])  # the mean
    assert np.array_equal(out[8], [20.0, 21.0])  # three pieces, longest first in the arithmetic
    assert stats.fvt_fallbacks == 2
    with pytest.raises(ValueError, match="pieces"):
        resize_table(table, plan_rows(4, 4, 7, 8), Init.FVT, dtype=F32, padding_init=Init.MEAN)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_fvt_blocks_of_tokens_give_the_per_token_means(workers: int) -> None:
    # More piece rows than one block holds, pieces of every length: each row is its pieces' mean,
    # whichever threads share the blocks.
    rng = np.random.default_rng(0)
    table = rng.integers(-64, 64, size=(3000, 3)).astype(np.float32)
    pieces = [[int(t) for t in rng.integers(0, 3000, size=n)] for n in rng.integers(1, 7, size=2500)]
    plan = plan_rows(3000, 3000, 5500, 5504)
    out, stats = resize_table(table, plan, Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=pieces, workers=workers)
    expected = np.stack([table[ids].astype(np.float64).mean(axis=0) for ids in pieces]).astype(np.float32)
    assert np.array_equal(out[3000:5500], expected) and stats.fvt_fallbacks == 0


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fvt_of_few_distinct_pieces_is_each_tokens_mean_either_way(
    dtype: DType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new script's tokens split into a few byte pieces: their rows are widened once. The rows are the
    # pieces' float64 sum, in order, over their count, rounded once, as when every piece is widened at its use.
    rng = np.random.default_rng(1)
    table = torch_as_array(torch.from_numpy(rng.standard_normal((500, 64))).to(dtype.torch))
    pieces = [[int(t) for t in rng.choice([3, 17, 250, 499], size=n)] for n in rng.integers(1, 12, size=300)]
    plan = plan_rows(500, 500, 800, 800)
    few, _ = rows_after_kept(table, plan, Init.FVT, dtype=dtype, padding_init=Init.MEAN, pieces=pieces)
    monkeypatch.setattr(core_resize, "_FVT_DISTINCT_BYTES", 0)  # every piece widened where it is used
    each, _ = rows_after_kept(table, plan, Init.FVT, dtype=dtype, padding_init=Init.MEAN, pieces=pieces)
    old = torch.from_numpy(table.copy()).view(dtype.torch).double()
    expected = []
    for ids in pieces:
        total = torch.zeros(64, dtype=torch.float64)
        for i in ids:
            total += old[i]
        expected.append((total / len(ids)).float().to(dtype.torch))
    assert few.tobytes() == each.tobytes() == torch_as_array(torch.stack(expected)).tobytes()


def test_fvt_of_a_table_at_an_odd_offset_gathers_rows_without_copying_the_table() -> None:
    """A table mapped at an odd offset (an fp32 table in a Megatron run's .distcp) is not aligned: its rows
    are the same as an aligned copy's, and the gathers take its rows, not a whole aligned copy of it."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rows, width = 4000, 256
    data = rng.standard_normal((rows, width), dtype=np.float32)
    buffer = np.zeros(data.nbytes + 1, dtype=np.uint8)
    odd = np.frombuffer(buffer.data, np.float32, data.size, 1).reshape(data.shape)
    odd[...] = data
    assert not odd.flags.aligned
    pieces = [[int(t) for t in rng.integers(0, rows, size=n)] for n in rng.integers(1, 7, size=500)]
    plan = plan_rows(rows, rows, rows + 500, rows + 512)
    expected, _ = rows_after_kept(data, plan, Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=pieces)
    tracemalloc.start()
    try:
        got, stats = rows_after_kept(odd, plan, Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=pieces)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.tobytes() == expected.tobytes() and stats.fvt_fallbacks == 0
    assert peak < data.nbytes / 2  # the new rows and block-sized buffers, not a copy of the table


def test_fvt_norm_blocks_give_each_token_its_pieces_mean_at_the_median_norm() -> None:
    # As above, over several blocks of rows and tokens; a trained padding row (3000) and two fallbacks.
    rng = np.random.default_rng(0)
    table = rng.integers(-64, 64, size=(3001, 3)).astype(np.float32)
    table[3000] = 1e6
    pieces = [[int(t) for t in rng.integers(0, 3000, size=n)] for n in rng.integers(1, 7, size=2500)] + [[], [3000]]
    out, stats = resize_table(
        table, plan_rows(3000, 3001, 5502, 5504), Init.FVT_NORM, dtype=F32, padding_init=Init.MEAN, pieces=pieces
    )
    real = table[:3000].astype(np.float64)
    median = np.median(np.linalg.norm(real, axis=1))
    fvt = np.stack([table[ids].astype(np.float64).mean(axis=0) for ids in pieces[:2500]] + [real.mean(axis=0)] * 2)
    expected = fvt * (median / np.linalg.norm(fvt, axis=1))[:, None]
    assert np.allclose(out[3000:5502], expected, rtol=1e-6, atol=0) and stats.fvt_fallbacks == 2
    assert np.array_equal(out[5502:], np.tile(real.mean(axis=0).astype(np.float32), (2, 1)))  # padding: plain mean


def test_normal_init_matches_old_row_statistics_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((4000, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]).astype(np.float32)
    plan = plan_rows(4000, 4000, 8000, 8000)
    out, _ = resize_table(table, plan, Init.NORMAL, dtype=F32, padding_init=Init.MEAN, rng=np.random.default_rng(1))
    new = out[4000:]
    assert np.allclose(new.mean(0), table.mean(0), atol=0.1)
    assert np.allclose(new.std(0), table.std(0), rtol=0.1)
    again, _ = resize_table(table, plan, Init.NORMAL, dtype=F32, padding_init=Init.MEAN, rng=np.random.default_rng(1))
    assert np.array_equal(out, again)


def test_shrink_is_refused_unless_allowed() -> None:
    with pytest.raises(ShrinkRefusedError, match="3 trained rows would be dropped"):
        plan_rows(8, 8, 5, 8)
    out, _ = resize_table(
        _table(8), plan_rows(8, 8, 5, 8, allow_shrink=True), Init.ZEROS, dtype=F32, padding_init=Init.MEAN
    )
    assert np.array_equal(out[:5], _table(5))


def test_rows_after_kept_are_the_whole_difference_and_the_old_table_is_only_read() -> None:
    # Shrinking 6 tokens to 4 in 8 rows: after the 4 kept rows come 4 padding rows, the mean of the
    # 6 old tokens (0 + 10 + ... + 50) / 6 = 25 (the dropped tokens 4 and 5 are still in it).
    old = _table(8)
    old.setflags(write=False)  # as a table mapped from its file
    plan = plan_rows(6, 8, 4, 8, allow_shrink=True)
    tail, stats = rows_after_kept(old, plan, Init.ZEROS, dtype=F32, padding_init=Init.MEAN)
    assert np.array_equal(tail, np.full((4, 2), [25.0, 26.0])) and (stats.copied, stats.padding) == (4, 4)
    # Growing 5 tokens in 8 rows to 7 in 12: 2 new tokens and 5 padding rows, all the mean of the 5 old tokens.
    tail, stats = rows_after_kept(old, plan_rows(5, 8, 7, 12), Init.MEAN, dtype=F32, padding_init=Init.MEAN)
    assert np.array_equal(tail, np.full((7, 2), [20.0, 21.0])) and (stats.initialised, stats.padding) == (2, 5)
    assert np.array_equal(old, _table(8))
    # fvt takes each new token's pieces as given (new token 5 is old tokens 0 and 2); other inits ignore them.
    fvt, _ = rows_after_kept(old, plan_rows(5, 8, 6, 8), Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=[[0, 2]])
    zeros, _ = rows_after_kept(
        old, plan_rows(5, 8, 6, 8), Init.ZEROS, dtype=F32, padding_init=Init.MEAN, pieces=[[0, 2]]
    )
    assert np.array_equal(fvt[0], [10.0, 11.0]) and np.array_equal(zeros[0], [0.0, 0.0])


def test_rows_after_kept_fill_the_buffer_they_are_given_and_refuse_one_of_another_shape() -> None:
    # A writer's buffer takes the rows where they are computed: the same rows as a fresh array, in it.
    old = _table(8)
    plan = plan_rows(5, 8, 7, 12)  # 2 new tokens (fvt: old 0 and 2; old 1), 5 padding rows
    expected, _ = rows_after_kept(old, plan, Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=[[0, 2], [1]])
    buffer = np.full((7, 2), -1.0, dtype=np.float32)
    tail, _ = rows_after_kept(old, plan, Init.FVT, dtype=F32, padding_init=Init.MEAN, pieces=[[0, 2], [1]], out=buffer)
    assert tail is buffer and np.array_equal(buffer, expected)
    assert np.array_equal(buffer[:2], [[10.0, 11.0], [10.0, 11.0]])
    for wrong in (np.empty((6, 2), np.float32), np.empty((7, 2), np.float64)):
        with pytest.raises(ValueError, match="expected an output of shape"):
            rows_after_kept(old, plan, Init.MEAN, dtype=F32, padding_init=Init.MEAN, out=wrong)


def test_bf16_rows_stay_bit_exact() -> None:
    table = torch_as_array(torch.randn(6, 4).to(torch.bfloat16))
    out, _ = resize_table(table, plan_rows(6, 6, 9, 12), Init.MEAN, dtype=BF16, padding_init=Init.MEAN)
    assert out.dtype == np.uint16 and np.array_equal(out[:6], table)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_widening_and_rounding_agree_with_torch_on_every_kind_of_value(dtype: torch.dtype) -> None:
    # float64 values around every rounding case: ties (both parities), just off ties, subnormals,
    # overflow to inf, inf, NaN, signed zeros; torch's own .to(dtype) is the reference.
    info = torch.finfo(dtype)
    rng = np.random.default_rng(0)
    mantissas = 1 + np.arange(2048) * 2.0**-11
    cases = np.concatenate(
        [
            rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, size=20000),
            mantissas,
            -mantissas,
            mantissas + 2.0**-30,
            mantissas * info.tiny,  # subnormals of the 16-bit types
            [info.max * 1.01, -info.max * 1.01, np.inf, -np.inf, np.nan, 0.0, -0.0],
        ]
    )
    mine = from_float64(cases, dtype_of(dtype))
    theirs = torch.from_numpy(cases).to(dtype)
    assert np.array_equal(mine.view(np.uint8), torch_as_array(theirs).view(np.uint8))  # bit for bit
    widened = widen(torch_as_array(theirs), dtype_of(dtype))
    assert np.array_equal(widened.astype(np.float64), theirs.double().numpy(), equal_nan=True)
    assert widened.dtype in (np.float32, np.float64)


def test_integer_tables_are_not_resized_with_statistics() -> None:
    with pytest.raises(ValueError, match="only floating-point tables"):
        resize_table(
            np.zeros((4, 2), dtype=np.int64),
            plan_rows(4, 4, 6, 6),
            Init.MEAN,
            dtype=BY_NAME["int64"],
            padding_init=Init.MEAN,
        )


@pytest.mark.parametrize(("tp_from", "tp_to"), [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4)])
def test_tp_resplit_moves_every_rank_range(tp_from: int, tp_to: int) -> None:
    # 5 tokens; padded to multiple 2*tp. Resize globally, then split for the new TP.
    old_rows = padded_vocab_size(5, 2, tp_from)
    full = _table(old_rows)
    shards = split_vocab_rows(full, tp_from)
    joined = join_vocab_shards(shards)
    assert np.array_equal(joined, full)
    new_rows = padded_vocab_size(11, 2, tp_to)
    out, _ = resize_table(joined, plan_rows(5, old_rows, 11, new_rows), Init.ZEROS, dtype=F32, padding_init=Init.MEAN)
    blocks = split_vocab_rows(out, tp_to)
    for rank, block in enumerate(blocks):
        start, stop = tp_row_range(new_rows, tp_to, rank)
        assert np.array_equal(block, out[start:stop])
    assert np.array_equal(np.concatenate(blocks)[:5], full[:5])


@pytest.mark.parametrize(("vocab_old", "vocab_new", "hidden", "tp"), [(50257, 57257, 2048, 1), (32000, 48000, 8192, 8)])
def test_real_sizes_on_meta_device(vocab_old: int, vocab_new: int, hidden: int, tp: int) -> None:
    # 1.3B (GPT-2 vocab) and 70B (Llama vocab, hidden 8192) shapes, untied, no memory used: the plan
    # and the entries a resize writes, from shapes alone.
    old_rows = padded_vocab_size(vocab_old, 128, tp)
    new_rows = padded_vocab_size(vocab_new, 128, tp)
    emb, out = "model.embedding.word_embeddings.weight", "model.output_layer.weight"
    tables = {k: torch.empty(old_rows, hidden, device="meta", dtype=torch.bfloat16) for k in (emb, out)}
    ckpt = Checkpoint(tables, {"tensor_model_parallel_size": tp}, DISTRIBUTED)
    plan = plan_resize(ckpt, vocab_old, vocab_new, init=Init.MEAN, padding_init=Init.MEAN)
    assert (plan.rows.old_rows, plan.rows.new_rows, plan.tensor_parallel) == (old_rows, new_rows, tp)
    assert [(c.name, c.rows) for c in plan.rows.classes()][-2:] == [
        ("new tokens", vocab_new - vocab_old),
        ("new padding", new_rows - vocab_new),
    ]
    resized, finished = resize_while_writing(ckpt, plan, (None, None), WORDING, seed=0)
    for key in (emb, out):
        entry = held(resized.tensors, key)
        assert isinstance(entry, Deferred) and (entry.shape, entry.dtype) == ((new_rows, hidden), BF16)
        assert entry.nbytes == new_rows * hidden * 2
    with pytest.raises(NotImplementedError, match="meta tensor"):  # the values themselves need real tables
        finished()
    assert [tp_row_range(new_rows, tp, r)[1] - tp_row_range(new_rows, tp, r)[0] for r in range(tp)] == [
        new_rows // tp
    ] * tp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite_on_every_kind_of_value(dtype: torch.dtype) -> None:
    from nemo_vocab_ext.validate import all_finite

    info = torch.finfo(dtype)
    finite = torch.tensor([0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4], dtype=dtype)
    assert all_finite(finite) and all_finite(finite.reshape(2, 4)) and all_finite(finite[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 5, 7):
            t = finite.clone()
            t[at] = bad
            assert not all_finite(t) and not all_finite(t, block=3)  # found in any block
    assert all_finite(finite, block=3)


def test_tied_copies_are_read_and_resized_once() -> None:
    # A legacy checkpoint saves the tied output layer as a second name for the embedding's storage.
    table = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    emb, head = "model.language_model.embedding.word_embeddings.weight", "model.word_embeddings_for_head.weight"
    ckpt = Checkpoint({emb: table, head: table}, {}, DISTRIBUTED)
    tables = vocab_tables(ckpt)
    assert tables[emb] is tables[head] and tables[emb].shape == (8, 2)
    plan = plan_resize(ckpt, 5, 7, divisible_by=4, init=Init.MEAN, padding_init=Init.MEAN)
    new, done = resize_tables(ckpt, plan)
    assert new[emb] is new[head] and new[emb].array().shape == (8, 2) and [t.key for t in done] == [emb]
    assert np.array_equal(new[emb].array()[:5], torch_as_array(table)[:5])
