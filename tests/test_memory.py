"""core.memory: the fixed mmap threshold really gives a freed tensor-sized block back to the OS.

Each case runs in a fresh interpreter, since the setting is process-wide and one-way. The
scenario is the fragmentation the setting exists for: a 24 MB block freed once (which raises
glibc's default threshold), then a 16 MB block with a small live block allocated after it.
"""

import subprocess
import sys
import textwrap

import pytest

SCENARIO = textwrap.dedent("""
    import ctypes, sys
    from core.memory import fix_mmap_threshold
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()
    elif sys.argv[1].startswith("load:"):         # load:QUANT:MODEL_DIR, as a training job does
        from training.trainer import load_backbone
        _, quant, folder = sys.argv[1].split(":", 2)
        backbone = load_backbone(folder, quant)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    MB = 1 << 20
    libc.free(libc.malloc(24 * MB))          # like the model load's big temporaries
    block = libc.malloc(16 * MB)
    ctypes.memset(block, 1, 16 * MB)         # resident
    pin = libc.malloc(64 * 1024)             # a live block after it, as in a training step
    before = anon_mb()
    libc.free(block)
    print(before - anon_mb())
""")


def _released_mb(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", SCENARIO, mode], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_a_freed_block_goes_back_to_the_os_only_with_the_fixed_threshold():
    assert _released_mb("default") < 4      # glibc keeps it: the growth this module prevents
    assert _released_mb("fixed") > 12       # mapped on its own, unmapped on free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_loading_a_quantised_backbone_fixes_the_threshold_and_a_float32_one_does_not():
    """`training.trainer.load_backbone` is where the setting is applied (quantised jobs only):
    after an NF4 load the freed block goes back, after a float32 load it stays."""
    from tests.training_helpers import tiny_llama_dir

    folder = tiny_llama_dir()
    assert _released_mb(f"load:nf4:{folder}") > 12
    assert _released_mb(f"load:none:{folder}") < 4
