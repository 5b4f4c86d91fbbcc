"""The eight ophthalmic imaging modalities VisionFM pretrains one encoder each for, and their statistics.

VisionFM's own scripts spell the names differently from file to file (its loader says `Silt-Lamp`, its
statistics table `SlitLamp`, its data generator `SiltLamp` and `UltraSound`, its README `Silt Lamp`,
`B-Ultrasound` and `External Eye`), so every spelling maps to one canonical name here, case-insensitively.
"""
from __future__ import annotations

from typing import NamedTuple

from util.cli import UserError

# Canonical names, in VisionFM's statistics-table order.
MODALITIES: tuple[str, ...] = ("Fundus", "OCT", "FFA", "External", "SlitLamp", "Ultrasound", "UBM", "MRI")


class ModalityStats(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Per-channel mean/std in [0, 1] units, computed by VisionFM on its pretraining images of each modality.
STATS: dict[str, ModalityStats] = {
    "Fundus": ModalityStats((0.42374, 0.26095, 0.12840), (0.29483, 0.20167, 0.13668)),
    "OCT": ModalityStats((0.21092, 0.21092, 0.21092), (0.17599, 0.17599, 0.17599)),
    "FFA": ModalityStats((0.20205, 0.20205, 0.20201), (0.17406, 0.17404, 0.17401)),
    "External": ModalityStats((0.49363, 0.36325, 0.25957), (0.32001, 0.27109, 0.21992)),
    "SlitLamp": ModalityStats((0.55567, 0.40289, 0.38858), (0.26517, 0.23312, 0.23904)),
    "Ultrasound": ModalityStats((0.05989, 0.05979, 0.05669), (0.15428, 0.15505, 0.14465)),
    "UBM": ModalityStats((0.096110865,) * 3, (0.20977867,) * 3),
    "MRI": ModalityStats((0.17368862,) * 3, (0.16198656,) * 3),
}

# Spellings found in VisionFM's code and README besides the canonical names (compared after `_key`).
_ALIASES: dict[str, str] = {
    "silt-lamp": "SlitLamp", "siltlamp": "SlitLamp", "silt lamp": "SlitLamp", "slit lamp": "SlitLamp",
    "slit-lamp": "SlitLamp", "slit_lamp": "SlitLamp",
    "ultrasound": "Ultrasound", "b-ultrasound": "Ultrasound", "b ultrasound": "Ultrasound",
    "b-scan ultrasound": "Ultrasound",
    "external eye": "External", "externaleye": "External", "external_eye": "External",
}


class UnknownModalityError(UserError, ValueError):
    pass


def _key(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


_LOOKUP: dict[str, str] = {_key(m): m for m in MODALITIES}
_LOOKUP.update({_key(a): m for a, m in _ALIASES.items()})


def canonical_modality(name: str, flag: str = "--modality") -> str:
    """The canonical name of a modality given in any of the spellings VisionFM uses (case-insensitive)."""
    found = _LOOKUP.get(_key(name))
    if found is None:
        raise UnknownModalityError(f"unknown {flag} '{name}'; choose one of {', '.join(MODALITIES)} "
                                   "(aliases such as 'Silt Lamp', 'B-Ultrasound', 'External Eye' are accepted)")
    return found


def modality_stats(name: str, flag: str = "--modality") -> ModalityStats:
    """(mean, std) for the images of a modality, any spelling."""
    return STATS[canonical_modality(name, flag)]


def modality_folder_names(name: str) -> list[str]:
    """Folder names under a VisionFM data root that may hold a modality's images: the canonical name
    first, then every alias spelling as written in VisionFM (for `data_path/<Modality>/*`)."""
    canon = canonical_modality(name)
    spelled = {"SlitLamp": ["Silt-Lamp", "SiltLamp", "Silt Lamp", "Slit Lamp", "Slit-Lamp"],
               "Ultrasound": ["UltraSound", "B-Ultrasound"], "External": ["External Eye"]}
    return [canon, *spelled.get(canon, [])]
