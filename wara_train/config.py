"""`WaraConfig`: the validated hyper-parameters of one WaRA adapter (DESIGN.md section 3)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError
from .wavelets import MODES, WaveletSpec

FORMAT = "wara"
FORMAT_VERSION = 1
FACTORIZATIONS: tuple[str, ...] = ("subband",)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")

Factorization = Literal["subband"]


@dataclass(frozen=True)
class WaraConfig:
    """Hyper-parameters of a WaRA adapter.

    ``ΔW = (alpha / rank) · IDWT2_levels(C)`` where every coefficient block s of C is
    ``B_s @ A_s`` (factorization "subband").

    ``target_modules`` selects the layers to adapt, as peft does: a list of exact module names
    or name suffixes (``"query"`` matches ``encoder.layer.0.attention.self.query``), or one string
    used as a regular expression that must match the whole name. In a saved artifact it is the
    list of full names that were matched. ``modules_to_save`` names small dense modules (a task
    head) trained in full and saved with the adapter.
    """

    rank: int = 4
    alpha: float = 8.0
    wavelet: str = "haar"
    mode: str = "periodization"
    levels: int = 1
    factorization: str = "subband"
    target_modules: tuple[str, ...] | str = ()
    modules_to_save: tuple[str, ...] = ()
    dtype: str = "float32"
    version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ConfigError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}: valid modes are {', '.join(MODES)}")
        if self.factorization not in FACTORIZATIONS:
            raise ConfigError(
                f"unknown factorization {self.factorization!r}: valid values are {', '.join(FACTORIZATIONS)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: valid values are {', '.join(DTYPES)}")
        if self.version != FORMAT_VERSION:
            raise ConfigError(f"unsupported format_version {self.version!r}: this build reads version {FORMAT_VERSION}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, (list, str)):
            mts = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
            object.__setattr__(self, "modules_to_save", mts)
        if not isinstance(self.target_modules, (str, tuple)) or (
            isinstance(self.target_modules, tuple) and not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ConfigError("target_modules must be a list of module names or one regex string")
        if not all(isinstance(t, str) and t for t in self.modules_to_save):
            raise ConfigError("modules_to_save must be a list of module names")
        self.spec  # validates wavelet and levels

    @property
    def spec(self) -> WaveletSpec:
        return WaveletSpec(self.wavelet, self.mode, self.levels)  # type: ignore[arg-type]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def replace(self, **changes: Any) -> "WaraConfig":
        return WaraConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("version")
        d["target_modules"] = d["target_modules"] if isinstance(d["target_modules"], str) else list(d["target_modules"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WaraConfig":
        known = {f.name for f in fields(cls)} - {"version"}
        return cls(**{k: v for k, v in d.items() if k in known})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def wara_param_count(m: int, n: int, *, rank: int, levels: int) -> int:
    """Trainable factors of one (m, n) layer: ``rank · Σ_s (m_s + n_s)`` over all blocks.

    For one level this is ``2·rank·(m + n)``, the count of a LoRA of rank ``2·rank``."""
    total = (m >> levels) + (n >> levels)  # a_J
    for j in range(1, levels + 1):
        total += 3 * ((m >> j) + (n >> j))
    return rank * total
