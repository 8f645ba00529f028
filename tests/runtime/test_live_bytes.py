"""The live-bytes accounting counts what ops allocate, once per storage, and nothing from before."""
import torch

import seqweave
from seqweave.runtime import host_pool
from seqweave.runtime.live_bytes import LiveBytes

MB = 1 << 20


def test_peak_is_the_most_held_at_once_views_and_inplace_counted_once():
    weight = torch.ones(MB // 4)  # made before: never counted, nor are views of it
    with LiveBytes() as live:
        a = torch.zeros(MB // 4)          # 1 MiB
        view = a[: MB // 8]               # a view: nothing new
        a.add_(1)                         # in place: nothing new
        b = torch.zeros(MB // 2)          # 2 MiB: 3 held
        del b
        c = weight.t()                    # a view of memory from before
        d = torch.zeros(MB // 8)          # 0.5 MiB: 1.5 held
    assert live.device_peak == 3 * MB
    assert live.device_now == MB + MB // 2
    assert view.numel() and c.numel() and d.numel()


def test_host_pool_arenas_are_accounted_apart_and_reused_when_free():
    host_pool.release_all()
    with LiveBytes() as live:
        first = host_pool.acquire(MB, torch.device("cpu"))
        held = first[:16].clone()  # a device allocation while the arena is busy
        second = host_pool.acquire(MB, torch.device("cpu"))
        assert second.data_ptr() != first.data_ptr(), "a busy arena must not be handed out twice"
        assert live.host_now == 2 * MB
        small = torch.zeros(4)  # the accounting samples at ops: one while both arenas are busy
        del first
        third = host_pool.acquire(MB, torch.device("cpu"))
        assert host_pool.bytes_reserved() == 2 * MB, "the freed arena is reused, not a new one made"
    assert live.host_peak == 2 * MB
    assert live.device_peak == held.numel() + small.numel() * 4  # uint8 copy + fp32 zeros
    assert host_pool.device_of(third[:8]) == torch.device("cpu")
    host_pool.release_all()


def test_compiled_programs_run_inside_the_accounting():
    """torch.compile must not fall back to eager under the accounting (it would count eager's ops)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    backend = seqweave.backend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(512, 64, requires_grad=True)
    compiled(x).sum().backward()
    ran = []
    forward = backend.graphs[0]
    assert forward.kind == "forward"
    from seqweave.runtime import program

    original = program.Program.__call__

    def counting(self, args):
        ran.append(self.name)
        return original(self, args)

    program.Program.__call__ = counting
    try:
        with LiveBytes() as live:
            compiled(x).sum().backward()
    finally:
        program.Program.__call__ = original
    assert ran == ["forward", "backward"]
    assert live.device_peak >= 2 * 512 * 64 * 4  # two hidden activations at least
