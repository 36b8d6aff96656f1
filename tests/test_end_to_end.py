"""The end-to-end verdict under the bound rule: the float64 floor follows the target's compute dtype, and the
float64 replay keeps a bounded number of widened weights."""

from __future__ import annotations

from collections import Counter

import torch

from tapml.carving import FixtureStore, carve
from tapml.engine import end_to_end, exact
from tapml.judging import Judge


def _outputs(noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(64, 256, generator=g, dtype=torch.float64)
    reference = truth.float()  # float32 rounding: the reference's own distance from the truth
    target = (truth * (1 + noise * torch.randn(truth.shape, generator=g, dtype=torch.float64))).float()
    return target, reference, truth


def test_a_bfloat16_target_on_a_float32_model_gets_bfloat16_rounding_end_to_end():
    target, reference, truth = _outputs(2.0**-9)  # about half a bfloat16 ulp per element
    assert not end_to_end(target, reference, Judge(rule="bound"), exact=[truth]).ok  # a float32 target: too far
    m = end_to_end(target, reference, Judge(rule="bound", compute_dtype="bfloat16"), exact=[truth])
    assert m.ok and m.bound.ratio < 1


def test_the_compute_dtype_never_hides_an_error_beyond_its_own_rounding():
    target, reference, truth = _outputs(0.05)  # 5%: far beyond bfloat16's 0.4%
    for dtype in (None, "bfloat16", "float16"):
        m = end_to_end(target, reference, Judge(rule="bound", compute_dtype=dtype), exact=[truth])
        assert not m.ok and m.bound.ratio > 1, dtype


def test_the_float64_replay_is_the_same_with_a_bounded_weight_cache(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)).eval()
    x = torch.randn(4, 32)

    def run():
        h = x
        for _ in range(3):  # the same weights read again: a cache hit, or widened anew when evicted
            h = model(h)
        return h

    with torch.no_grad():
        carve(model, run, tmp_path / "store")
    store = FixtureStore(tmp_path / "store")
    cached, evicting = exact.exact_outputs(store), exact.exact_outputs(store, cache_bytes=0)
    assert cached is not None and len(cached) == 1 and cached[0].dtype == torch.float64
    assert torch.equal(cached[0], evicting[0])
    cache = exact.WidenedCache(budget=3 * 8 * 10)
    for k in range(5):
        cache[f"k{k}"] = torch.zeros(10, dtype=torch.float64)
    assert cache.used <= cache.budget and "k4" in cache and "k0" not in cache


def test_the_float64_replay_keeps_only_weights_read_again_and_skips_token_outputs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        carve(model, lambda: model(model(x)).argmax(-1), tmp_path / "tokens")  # integer outputs only
    store = FixtureStore(tmp_path / "tokens")
    assert exact.exact_outputs(store) == [None]  # nothing to judge in float64: nothing replayed
    cache = exact.WidenedCache(reads=Counter({"twice": 2, "once": 1}))
    cache["once"] = torch.zeros(4, dtype=torch.float64)
    cache["twice"] = torch.zeros(4, dtype=torch.float64)
    assert "once" not in cache and "twice" in cache  # a leaf read only once is not kept
    cache.read("twice")
    cache.read("twice")
    assert "twice" not in cache and cache.used == 0  # dropped after its last read
