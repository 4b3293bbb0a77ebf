"""Core arithmetic and row-class resize on hand-written integer tensors and meta-device shapes."""

from __future__ import annotations

import pytest
import torch

from nemo_vocab_ext.core.keys import UnknownKeysError, find_vocab_keys, normalize_key
from nemo_vocab_ext.core.resize import join_vocab_shards, resize_table, split_vocab_rows
from nemo_vocab_ext.core.rows import Init, ShrinkRefusedError, plan_rows
from nemo_vocab_ext.core.sizes import padded_vocab_size, tp_row_range


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"),
    [(50257, 1, 50304), (50257, 2, 50432), (50257, 4, 50688), (50257, 8, 51200), (512, 1, 512), (513, 1, 640)],
)
def test_padded_vocab_size_rounds_up_to_divisible_times_tp(vocab: int, tp: int, padded: int) -> None:
    assert padded_vocab_size(vocab, 128, tp) == padded


def test_padded_vocab_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        padded_vocab_size(0)
    with pytest.raises(ValueError):
        padded_vocab_size(10, 0)


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


def _table(rows: int, width: int = 2) -> torch.Tensor:
    # Row i is [10*i, 10*i + 1, ...]: every row is recognisable.
    return (torch.arange(rows).unsqueeze(1) * 10 + torch.arange(width)).float()


def test_row_classes_copy_drop_init_and_pad() -> None:
    # 5 real tokens padded to 8 rows, grown to 7 tokens padded to 12 rows.
    table = _table(8)
    plan = plan_rows(5, 8, 7, 12)
    out, stats = resize_table(table, plan, Init.ZEROS)
    assert out.shape == (12, 2)
    assert torch.equal(out[:5], table[:5])  # old real rows bit-exact
    assert torch.equal(out[5:7], torch.zeros(2, 2))  # new tokens: zeros, NOT the old padding rows 5..7
    mean = table[:5].mean(0)  # padding = mean of old REAL rows only
    assert torch.equal(out[7:], mean.expand(5, -1))
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
    out, _ = resize_table(table, plan_rows(3, 4, 5, 6), Init.MEAN)
    assert torch.equal(out[3], torch.tensor([10.0, 11.0]))
    assert torch.equal(out[4], torch.tensor([10.0, 11.0]))


def test_fvt_is_the_mean_of_piece_rows_with_mean_fallback() -> None:
    table = _table(4)
    out, stats = resize_table(table, plan_rows(4, 4, 7, 8), Init.FVT, pieces=[[0, 2], [3], []])
    assert torch.equal(out[4], torch.tensor([10.0, 11.0]))  # mean of rows 0 and 2
    assert torch.equal(out[5], table[3])
    assert torch.equal(out[6], table.mean(0))  # no pieces: mean
    assert stats.fvt_fallbacks == 1
    with pytest.raises(ValueError, match="pieces"):
        resize_table(table, plan_rows(4, 4, 7, 8), Init.FVT)


def test_normal_init_matches_old_row_statistics_and_is_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(4000, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([3.0, -1.0, 0.0])
    plan = plan_rows(4000, 4000, 8000, 8000)
    out, _ = resize_table(table, plan, Init.NORMAL, generator=torch.Generator().manual_seed(1))
    new = out[4000:]
    assert torch.allclose(new.mean(0), table.mean(0), atol=0.1)
    assert torch.allclose(new.std(0), table.std(0), rtol=0.1)
    again, _ = resize_table(table, plan, Init.NORMAL, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_shrink_is_refused_unless_allowed() -> None:
    with pytest.raises(ShrinkRefusedError, match="3 trained rows would be dropped"):
        plan_rows(8, 8, 5, 8)
    out, _ = resize_table(_table(8), plan_rows(8, 8, 5, 8, allow_shrink=True), Init.ZEROS)
    assert torch.equal(out[:5], _table(5))


def test_bf16_rows_stay_bit_exact() -> None:
    table = torch.randn(6, 4).to(torch.bfloat16)
    out, _ = resize_table(table, plan_rows(6, 6, 9, 12), Init.MEAN)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:6].view(torch.int16), table.view(torch.int16))


@pytest.mark.parametrize(("tp_from", "tp_to"), [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4)])
def test_tp_resplit_moves_every_rank_range(tp_from: int, tp_to: int) -> None:
    # 5 tokens; padded to multiple 2*tp. Resize globally, then split for the new TP.
    old_rows = padded_vocab_size(5, 2, tp_from)
    full = _table(old_rows)
    shards = split_vocab_rows(full, tp_from)
    joined = join_vocab_shards(shards)
    assert torch.equal(joined, full)
    new_rows = padded_vocab_size(11, 2, tp_to)
    out, _ = resize_table(joined, plan_rows(5, old_rows, 11, new_rows), Init.ZEROS)
    blocks = split_vocab_rows(out, tp_to)
    for rank, block in enumerate(blocks):
        start, stop = tp_row_range(new_rows, tp_to, rank)
        assert torch.equal(block, out[start:stop])
    assert torch.equal(torch.cat(blocks)[:5], full[:5])


@pytest.mark.parametrize(("vocab_old", "vocab_new", "hidden", "tp"), [(50257, 57257, 2048, 1), (32000, 48000, 8192, 8)])
def test_real_sizes_on_meta_device(vocab_old: int, vocab_new: int, hidden: int, tp: int) -> None:
    # 1.3B (GPT-2 vocab) and 70B (Llama vocab, hidden 8192) shapes, no memory used.
    old_rows = padded_vocab_size(vocab_old, 128, tp)
    new_rows = padded_vocab_size(vocab_new, 128, tp)
    table = torch.empty(old_rows, hidden, device="meta", dtype=torch.bfloat16)
    for init in (Init.ZEROS, Init.MEAN):
        out, stats = resize_table(table, plan_rows(vocab_old, old_rows, vocab_new, new_rows), init)
        assert out.device.type == "meta"
    assert out.shape == (new_rows, hidden) and out.dtype == torch.bfloat16
    assert stats.initialised == vocab_new - vocab_old
    assert [b.shape[0] for b in split_vocab_rows(out, tp)] == [new_rows // tp] * tp


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
