"""The client's OpenMP wait policy: tapml sets it before torch loads; with torch imported first it cannot,
and a worker spawned on this machine says so (its kernels share the cores with the client's threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import warnings
{imports}
from tapml.remote import RemoteTarget
from tapml.settings import Settings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    Settings(platform="torch-cpu").open_target().close()  # what tapml offload does
    RemoteTarget(spawn="torch-cpu").close()  # the engine used directly
named = [w for w in caught if "OMP_WAIT_POLICY" in str(w.message)]
print(tapml.OMP_SPINS, len(named), sorted({{w.filename for w in named}}))
"""


@pytest.mark.parametrize("imports,env,expected", [
    ("import torch\nimport tapml", {}, "True 2 ['<string>']"),  # each names the caller's line, not tapml's
    ("import tapml\nimport torch", {}, "False 0 []"),
    ("import torch\nimport tapml", {"OMP_WAIT_POLICY": "PASSIVE"}, "False 0 []"),
])
def test_a_spinning_client_is_named_when_it_spawns_a_worker(imports, env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == expected
