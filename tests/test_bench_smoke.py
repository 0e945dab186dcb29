"""Every benchmark at a tiny size, so they never rot (the real runs are not part of CI; see docs/performance.md)."""

from bench import compile as compile_bench
from bench import kernels, memory, mmdit, vae


def test_kernels_bench(capsys):
    kernels.main(["--scale", "0.02", "--repeat", "1"])
    assert "group_norm_silu" in capsys.readouterr().out


def test_mmdit_bench(capsys):
    mmdit.main(["--size", "32", "--repeat", "1", "--layers", "1"])
    assert "| 32 | numba |" in capsys.readouterr().out


def test_vae_bench(capsys):
    vae.main(["--latent", "4", "--filters", "32", "--repeat", "1"])
    assert "| numba |" in capsys.readouterr().out


def test_memory_bench(tmp_path, capsys):
    memory.main(["--size", "32", "--layers", "1", "--file", str(tmp_path / "mmdit.safetensors")])
    assert '"finite": true' in capsys.readouterr().out


def test_convert_bench(tmp_path, capsys):
    from bench import convert

    convert.main(["--tiny", "--dir", str(tmp_path)])
    assert "| KerasHub preset → canonical |" in capsys.readouterr().out


def test_end_to_end_bench(tmp_path, capsys):
    from bench import end_to_end

    end_to_end.main(["--tiny", "--dir", str(tmp_path), "--cache-gb", "0.01"])
    out = capsys.readouterr().out
    assert "| T5-XXL |" in out and "| VAE decode |" in out and "image finite: True" in out
    assert not list(tmp_path.iterdir())  # the random file is deleted without --keep


def test_compile_bench(capsys):
    compile_bench.main([])
    assert "| filled cache (load) |" in capsys.readouterr().out


def test_trace_bench(capsys):
    from bench import trace

    trace.main(["--repeat", "1", "--calls", "1"])
    assert "tracing off" in capsys.readouterr().out


def test_allocator_bench(capsys):
    from bench import allocator

    allocator.main(["--scale", "0.05", "--pairs", "1", "--repeat", "1"])
    assert "| VAE decode to 25×25 |" in capsys.readouterr().out
