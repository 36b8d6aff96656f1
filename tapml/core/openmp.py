"""Whether this process's OpenMP threads spin after each parallel region (libgomp's default wait policy).

``tapml/__init__`` looks before torch loads (it sets ``OMP_WAIT_POLICY=PASSIVE`` there) and records
here what it found, so the layers below it (the worker spawner) can warn: a spinning client takes the
cores its local worker needs."""

__all__ = ["openmp_spins", "record_openmp_spins"]

_spins = False  # torch was loaded before tapml, with neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT set


def record_openmp_spins(spins: bool) -> None:
    global _spins
    _spins = bool(spins)


def openmp_spins() -> bool:
    return _spins
