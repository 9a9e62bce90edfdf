"""Per-row kernels split over vocabulary chunks (flash-decoding) give the answer of one
program per row: statistics against float64, argmax ties across chunk borders, the
published kept set from the radix threshold, the kept law's normaliser and top two
logits, and the very same draws for every split count (the noise is keyed by absolute
token id, so the sampling-law tests in test_triton_ops cover every split)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_law, filter_keys, filtered_law, restated_forward, sum_p_log_p  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_V = 8  # small tiles: a vocabulary of ~100 spans many tiles and several chunks
SPLITS = (1, 2, 3, 7)


def _rows(vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows with -inf entries, one row -inf over its whole first half (whole
    chunks without a finite entry), heavy ties, and a maximum tied across chunks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, vocab, generator=g) * 3
    x[:, 1::5] = -math.inf
    x[1, : vocab // 2] = -math.inf
    x[2] = torch.randint(-2, 2, (vocab,), generator=g).float()
    x[3, 2], x[3, vocab - 3] = 50.0, 50.0  # first index wins, even from another chunk
    x[4] = -math.inf
    x[4, vocab - 1] = 0.5  # the only finite entry sits in the last chunk
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [37, 101])
@pytest.mark.parametrize("splits", SPLITS)
def test_row_stats_of_every_split_match_float64(dtype, vocab, splits):
    from entrgi_kernels.row_stats import row_stats

    x = _rows(vocab, dtype)
    tau = 0.6
    stats = row_stats(x, tau, splits=splits, block_v=BLOCK_V)
    xd = x.cpu().double()
    p1, pt = torch.softmax(xd, -1), torch.softmax(xd / tau, -1)
    row_max = xd.max(-1, keepdim=True).values
    assert torch.equal(stats.row_max.cpu().double(), row_max.squeeze(-1))
    shifted = xd - row_max
    for got, want in ((stats.lse_tau_shifted, shifted / tau), (stats.lse_1_shifted, shifted)):
        torch.testing.assert_close(got.cpu().double(), torch.logsumexp(want, -1), atol=2e-6, rtol=0)
    torch.testing.assert_close(stats.entropy.cpu().double(), -sum_p_log_p(p1) / math.log(vocab), atol=2e-5, rtol=0)
    torch.testing.assert_close(stats.plogp_tau.cpu().double(), sum_p_log_p(pt), atol=5e-5, rtol=0)
    assert torch.equal(stats.argmax.cpu(), x.cpu().argmax(-1))


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_row_stats_when_every_tile_or_only_the_first_raises_the_maximum(tau):
    """The sums move to a new running maximum only in a tile that raises it: rows
    ascending (every tile does, each by 0.48 / tau: 9.6 at tau = 0.05), descending
    (only the first), and ascending with the same maximum again in a later tile (which
    must not move the argmax) agree with float64."""
    from entrgi_kernels.row_stats import row_stats

    ramp = torch.linspace(-3.0, 3.0, 101, dtype=torch.float64)
    tied = ramp.clone()
    tied[60:] = ramp[:41]  # a lower stretch after the maximum at 59 ...
    tied[80] = ramp[59]  # ... and the same maximum again, three tiles on
    xd = torch.stack([ramp, ramp.flip(0), tied])
    stats = row_stats(xd.float().to(DEVICE), tau, splits=1, block_v=BLOCK_V)
    shifted = xd - xd.max(-1, keepdim=True).values
    for got, want in ((stats.lse_tau_shifted, shifted / tau), (stats.lse_1_shifted, shifted)):
        torch.testing.assert_close(got.cpu().double(), torch.logsumexp(want, -1), atol=2e-6, rtol=0)
    p1, pt = torch.softmax(xd, -1), torch.softmax(xd / tau, -1)
    torch.testing.assert_close(stats.entropy.cpu().double(), -sum_p_log_p(p1) / math.log(101), atol=2e-5, rtol=0)
    torch.testing.assert_close(stats.plogp_tau.cpu().double(), sum_p_log_p(pt), atol=5e-5, rtol=0)
    assert stats.argmax.tolist() == [100, 0, 59]


@pytest.mark.parametrize("splits", SPLITS)
def test_row_stats_skip_rows_with_splits(splits):
    from entrgi_kernels.row_stats import row_stats

    x = _rows(101, torch.float32, seed=1)
    skip = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    full = row_stats(x, 0.8, splits=splits, block_v=BLOCK_V)
    part = row_stats(x, 0.8, skip=skip, splits=splits, block_v=BLOCK_V)
    for got, want in zip(part[:6], full[:6]):  # the per-row statistics, not the (absent) tile masses
        assert torch.equal(got[skip == 0], want[skip == 0])
        assert not got[skip != 0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", SPLITS)
def test_tile_masses_match_float64_for_every_split(dtype, splits):
    """The tempered mass of every BLOCK_V-wide tile (what a draw picks its tile by), the
    same bits for every split, and the row statistics no different for taking it."""
    from entrgi_kernels.row_stats import row_stats

    x, tau = _rows(101, dtype), 0.6
    stats = row_stats(x, tau, splits=splits, block_v=BLOCK_V, tiles=True)
    tiles = stats.tiles
    assert tiles.width == BLOCK_V and tiles.max.shape == (9, 13)
    padded = torch.nn.functional.pad(x.cpu().double(), (0, 13 * BLOCK_V - 101), value=-math.inf).view(9, 13, BLOCK_V)
    tile_max = padded.max(-1).values
    assert torch.equal(tiles.max.cpu().double(), tile_max)
    finite = tile_max > -math.inf
    assert (~finite).any() and not tiles.sum.cpu()[~finite].any()
    want = torch.logsumexp((padded - tile_max[..., None]) / tau, -1)
    torch.testing.assert_close(tiles.sum.cpu().double().log()[finite], want[finite], atol=1e-6, rtol=0)
    whole = row_stats(x, tau, splits=1, block_v=BLOCK_V, tiles=True).tiles
    assert torch.equal(whole.max, tiles.max) and torch.equal(whole.sum, tiles.sum)
    plain = row_stats(x, tau, splits=splits, block_v=BLOCK_V)
    for got, expected in zip(stats[:6], plain[:6]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_tile_masses_of_a_tile_without_mass_far_below_the_maximum():
    """A tile with no finite entry after a finite maximum of -100 at tau = 0.01: its
    scale to the running maximum must not be exp(100 / 0.01) = inf times a zero sum."""
    from entrgi_kernels.row_stats import row_stats

    x = torch.full((2, 3 * BLOCK_V), -math.inf)
    x[:, :BLOCK_V] = -100 + torch.randn(2, BLOCK_V, generator=torch.Generator().manual_seed(3))
    x = x.to(DEVICE)
    stats = row_stats(x, 0.01, splits=1, block_v=BLOCK_V, tiles=True)
    plain = row_stats(x, 0.01, splits=1, block_v=BLOCK_V)
    for got, expected in zip(stats[:6], plain[:6]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(stats.tiles.sum[:, 1:], torch.zeros_like(stats.tiles.sum[:, 1:]))


@pytest.mark.parametrize("tau", [0.7, 1.3])
def test_two_level_draws_follow_the_law_across_tiles(tau):
    """A draw races the tiles by their masses, then the winning tile's tokens: over six
    8-token tiles (one without a finite entry, the last of five tokens) every one of a
    row's four draws follows softmax(x / tau) (χ²), and two draws of a row agree about
    as often as independent ones would (sum p^2)."""
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import full_law_draws

    x = torch.randn(45, generator=torch.Generator().manual_seed(11)) * 1.5
    x[8:16] = -math.inf
    x[3] = -math.inf
    rows = x.expand(500, 45).contiguous().to(DEVICE)
    stats = row_stats(rows, tau, block_v=BLOCK_V, tiles=True)
    drawn = full_law_draws(rows, stats, torch.tensor([31], device=DEVICE), tau, 4).long().cpu()
    law = filtered_law(x, tau, 1.0, 0)
    assert_law(drawn.flatten(), law)
    agree = (drawn[:, :1] == drawn[:, 1:]).double().mean()
    collision = (law**2).sum()
    assert abs(agree - collision) < 4 * math.sqrt(collision * (1 - collision) / 500)


def test_rejection_sample_needs_the_tile_masses():
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import rejection_sample

    x = _rows(37, torch.float32)
    with pytest.raises(ValueError, match="tile masses: row_stats"):
        rejection_sample(x, row_stats(x, 0.9), torch.tensor([1], device=DEVICE), 0.9, 0.8, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p,top_k", [(0.8, 0), (0.3, 6), (1.0, 0), (0.05, 0)])
def test_rejection_draws_do_not_depend_on_the_split(dtype, top_p, top_k):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import rejection_sample

    x = torch.cat([_rows(101, dtype, seed=s) for s in range(2)])
    seed = torch.tensor([2024], device=DEVICE)
    skip = (torch.arange(18, device=DEVICE) % 5 == 1).to(torch.int32)
    draws = [
        rejection_sample(x, row_stats(x, 0.9, splits=s, block_v=BLOCK_V, tiles=True), seed, 0.9, top_p, top_k,
                         skip=skip, splits=s, block_v=BLOCK_V)
        for s in (1, 3, 7)
    ]  # fmt: skip
    tokens, accepted = draws[0]
    for other_tokens, other_accepted in draws[1:]:
        assert torch.equal(other_tokens, tokens) and torch.equal(other_accepted, accepted)
    assert accepted[skip != 0].all() and not tokens[skip != 0].any()
    live = (skip == 0) & (accepted == 1)
    assert live.sum() > 6, "most rows must accept one of their four draws"
    scaled = x.float() * torch.tensor(1.0 / 0.9)
    from entrgi.ops.reference import keep_threshold

    keep = scaled >= keep_threshold(scaled, top_p, top_k)[:, None]
    assert keep.gather(-1, tokens[:, None]).squeeze(-1)[live].all()
    if top_p == 1.0 and top_k == 0:
        assert accepted.all()


def test_rows_rejecting_every_draw_are_reported():
    """A kept set of one token with almost no mass: every draw is rejected, the row is
    flagged for the threshold path (token 0)."""
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import rejection_sample

    x = torch.zeros(3, 64, device=DEVICE)
    x[:, 10] = 1e-3  # top-1 holds about 1/64 of the mass
    stats = row_stats(x, 1.0, block_v=BLOCK_V, tiles=True)
    tokens, accepted = rejection_sample(
        x, stats, torch.tensor([5], device=DEVICE), 1.0, 1.0, 1, splits=2, block_v=BLOCK_V
    )
    draws_kept = accepted.bool()
    assert torch.equal(tokens[draws_kept], torch.full_like(tokens[draws_kept], 10))
    assert not tokens[~draws_kept].any()
    assert (~draws_kept).any(), "with p(keep) ~ 1/64 and four draws, most rows reject all"


def test_vocab_chunks_cover_the_vocabulary():
    from entrgi_kernels.launch import vocab_chunks

    for vocab, block, most in [(152_064, 2048, 9), (101, 8, 7), (10, 16, 4), (5, 8, 1)]:
        splits, chunk = vocab_chunks(vocab, block, most)
        assert chunk % block == 0 and 1 <= splits <= most
        assert (splits - 1) * chunk < vocab <= splits * chunk
    with pytest.raises(ValueError, match="splits must be >= 1"):
        vocab_chunks(100, 8, 4, splits=0)


def test_fewest_waves_splits_fill_the_last_wave():
    from entrgi_kernels.launch import fewest_waves_splits

    # 16 tiles on 132 SMs: 17 splits are three waves (the last of 8 programs), 16 two full ones
    assert fewest_waves_splits(16, 17, 132) == 16
    assert fewest_waves_splits(128, 3, 132) == 2  # 256 programs: 2 waves, as 384 would need 3
    assert fewest_waves_splits(4, 66, 132) == 33  # one full wave, fewest splits among equals
    assert fewest_waves_splits(7, 1, 132) == 1
    for tiles, most, slots in [(5, 9, 16), (3, 40, 7), (64, 5, 132), (1, 2, 1)]:
        chosen = fewest_waves_splits(tiles, most, slots)
        time = lambda s: -(-tiles * s // slots) / s  # noqa: E731
        assert -(-most // 2) <= chosen <= most
        assert time(chosen) == min(time(s) for s in range(-(-most // 2), most + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,d", [(101, 24), (96, 32)])  # the second fills whole tiles: loads without masks
def test_soft_embedding_of_every_split_matches_float64(dtype, vocab, d):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.soft_embedding import TileConfig, soft_embedding_forward

    x = _rows(vocab, dtype)
    table = torch.randn(vocab, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tau = 0.6
    stats = row_stats(x, tau)
    want, _, _ = restated_forward(x.cpu(), table.cpu(), tau)
    tile = TileConfig(block_n=16, block_v=16, block_d=32, num_warps=1, num_stages=1)  # tl.dot: sizes >= 16
    for splits in SPLITS:
        soft, _ = soft_embedding_forward(x, table, stats.tempered, stats.argmax, stats.entropy, stats.argmax, tau,
                                         config=tile, splits=splits)  # fmt: skip
        torch.testing.assert_close(soft.cpu().double(), want, atol=2e-5, rtol=2e-5, msg=f"splits={splits}")


def _kept_reference(x: torch.Tensor, tau: float, top_p: float, top_k: int) -> torch.Tensor:
    """(N, V) bool: the published kept set, on the kernels' fp32 x / tau."""
    from entrgi.ops.reference import keep_threshold

    scaled = x.float() * torch.tensor(1.0 / tau)
    return scaled >= keep_threshold(scaled, top_p, top_k)[:, None]


FILTERS = [(0.8, 0), (0.3, 6), (0.95, 1), (1.0, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p,top_k", FILTERS)
def test_threshold_of_every_split_keeps_the_reference_set(dtype, top_p, top_k):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.threshold import keep_threshold_keys

    x = torch.cat([_rows(101, dtype, seed=s) for s in range(2)])
    tau = 0.9
    norm = row_stats(x, tau).tempered
    skip = (torch.arange(18, device=DEVICE) % 4 == 1).to(torch.int32)
    expected = _kept_reference(x, tau, top_p, top_k)
    for splits in (1, 3, 7):
        keys = keep_threshold_keys(x, norm, tau, top_p, top_k, skip=skip, splits=splits, block_v=BLOCK_V)
        kept = filter_keys(x, tau) >= keys[:, None]
        assert torch.equal(kept[skip == 0], expected[skip == 0]), f"splits={splits}"
        assert not keys[skip != 0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p,top_k", FILTERS)
def test_kept_sample_of_every_split_matches_float64(dtype, top_p, top_k):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import sample_filtered
    from entrgi_kernels.threshold import keep_threshold_keys

    x = torch.cat([_rows(101, dtype, seed=s) for s in range(2)])
    tau = 0.9
    keys = keep_threshold_keys(x, row_stats(x, tau).tempered, tau, top_p, top_k)
    seed = torch.tensor([77], device=DEVICE)
    skip = (torch.arange(18, device=DEVICE) % 4 == 2).to(torch.int32)
    untouched = torch.full((18,), -1, dtype=torch.int64, device=DEVICE)
    drawn = [
        sample_filtered(x, keys, seed, tau, skip=skip, tokens=untouched.clone(), splits=s, block_v=BLOCK_V)
        for s in (1, 3, 7)
    ]
    live = skip == 0
    for other in drawn[1:]:
        for name in ("tokens", "top1", "top2"):
            assert torch.equal(other[name][live], drawn[0][name][live]), name
        torch.testing.assert_close(other["lse_kept_shifted"][live], drawn[0]["lse_kept_shifted"][live], atol=1e-6,
                                   rtol=1e-6)  # fmt: skip
    kept = _kept_reference(x, tau, top_p, top_k).cpu()
    scaled = torch.where(kept, x.cpu().double() / tau, -math.inf)
    ordered = scaled.sort(-1, descending=True).values
    out = {name: value.cpu() for name, value in drawn[0].items()}
    live = live.cpu()
    assert kept.gather(-1, out["tokens"].clamp_min(0)[:, None]).squeeze(-1)[live].all()
    assert (out["tokens"][~live] == -1).all()
    lse_shifted = torch.logsumexp(scaled - ordered[:, :1], -1)
    torch.testing.assert_close(out["lse_kept_shifted"][live].double(), lse_shifted[live], atol=2e-6, rtol=0)
    torch.testing.assert_close(out["top1"][live].double(), ordered[live, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["top2"][live].double(), ordered[live, 1], atol=1e-6, rtol=1e-6)


def test_tile_config_refuses_sizes_tl_dot_cannot_take():
    from entrgi_kernels.soft_embedding import TileConfig

    with pytest.raises(ValueError, match="TileConfig.block_v must be a power of two >= 16, got 8"):
        TileConfig(block_n=16, block_v=8, block_d=32)
    with pytest.raises(ValueError, match="TileConfig.block_d must be a power of two >= 16, got 48"):
        TileConfig(block_n=16, block_v=16, block_d=48)
