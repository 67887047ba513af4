"""The methods section of a run: the workflows' ``__desc__`` texts with their references.

Workflow descriptions cite as sMRIPrep's do, with pandoc-style keys (``[@n4]``,
``[@nipype1; @nipype2]``). :func:`compose_methods` numbers the keys in the order they are
first cited and collects the references, so ``logs/CITATION.md`` and the group report read
without pandoc. A key that names a harmonizer (``[@histmatch]``) resolves to that class's
``citation``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bids_harmony.harmonizers import HARMONIZERS

REFERENCES: dict[str, str] = {
    "nipype1": (
        "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS. "
        "Nipype: a flexible, lightweight and extensible neuroimaging data processing framework "
        "in Python. Front Neuroinform 5:13, 2011. doi:10.3389/fninf.2011.00013"
    ),
    "nipype2": "Esteban O, Markiewicz CJ, et al. nipy/nipype: Neuroimaging in Python pipelines "
               "and interfaces. Software, Zenodo. doi:10.5281/zenodo.596855",
    "niworkflows": "The NiPreps developers. niworkflows: common workflows for MRI "
                   "(DerivativesDataSink, LiterateWorkflow). Software. "
                   "https://github.com/nipreps/niworkflows",
    "n4": (
        "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: "
        "improved N3 bias correction. IEEE Trans Med Imaging 29(6):1310-1320, 2010. "
        "doi:10.1109/TMI.2010.2046908"
    ),
    "simpleitk": (
        "Lowekamp BC, Chen DT, Ibáñez L, Blezek D. The design of SimpleITK. Front Neuroinform "
        "7:45, 2013. doi:10.3389/fninf.2013.00045"
    ),
    "deepbet": (
        "Fisch L, Zumdick S, Barkhau C, Emden D, Ernsting J, Leenings R, Sarink K, Winter NR, "
        "Risse B, Dannlowski U, Hahn T. deepbet: Fast brain extraction of T1-weighted MRI using "
        "Convolutional Neural Networks. Comput Biol Med 179:108845, 2024. "
        "doi:10.1016/j.compbiomed.2024.108845"
    ),
    "ants": (
        "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration "
        "with cross-correlation: evaluating automated labeling of elderly and neurodegenerative "
        "brain. Med Image Anal 12(1):26-41, 2008. doi:10.1016/j.media.2007.06.004"
    ),
    "antspyx": (
        "Tustison NJ, Cook PA, Holbrook AJ, Johnson HJ, Muschelli J, Devenyi GA, Duda JT, "
        "Das SR, Cullen NC, Gillen DL, Yassa MA, Stone JR, Gee JC, Avants BB. The ANTsX "
        "ecosystem for quantitative biological and medical imaging. Sci Rep 11:9068, 2021. "
        "doi:10.1038/s41598-021-87564-6"
    ),
    "canny": (
        "Canny J. A computational approach to edge detection. IEEE Trans Pattern Anal Mach "
        "Intell 8(6):679-698, 1986. doi:10.1109/TPAMI.1986.4767851"
    ),
    "templateflow": (
        "Ciric R, Thompson WHH, Lorenz R, Goncalves M, MacNicol EE, Markiewicz CJ, Halchenko "
        "YO, Ghosh SS, Gorgolewski KJ, Poldrack RA, Esteban O. TemplateFlow: FAIR-sharing of "
        "multi-scale, multi-species brain models. Nat Methods 19:1568-1571, 2022. "
        "doi:10.1038/s41592-022-01681-2"
    ),
    "fonov2009": (
        "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average "
        "age-appropriate brain templates from birth to adulthood. NeuroImage 47(Suppl 1):S102, "
        "2009. doi:10.1016/S1053-8119(09)70884-5"
    ),
    "fonov2011": (
        "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average "
        "age-appropriate atlases for pediatric studies. NeuroImage 54(1):313-327, 2011. "
        "doi:10.1016/j.neuroimage.2010.07.033"
    ),
}

_CITATION = re.compile(r"\[(@[\w-]+(?:\s*;\s*@[\w-]+)*)\]")


@dataclass(frozen=True)
class Methods:
    """A methods section: paragraphs citing ``[n]`` and the numbered references."""

    paragraphs: tuple[str, ...]
    references: tuple[str, ...]

    def to_markdown(self) -> str:
        """``logs/CITATION.md``, as sMRIPrep writes its boilerplate."""
        numbered = [f"{number}. {text}" for number, text in enumerate(self.references, 1)]
        return "\n\n".join(["## Methods", *self.paragraphs, "### References",
                            "\n".join(numbered)]) + "\n"


def compose_methods(descriptions: Sequence[str]) -> Methods:
    """Split ``descriptions`` (e.g. ``workflow.visit_desc()``) into paragraphs at blank lines
    and replace each citation key by its number."""
    numbers: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        keys = [key.strip().lstrip("@") for key in match.group(1).split(";")]
        cited = [numbers.setdefault(key, len(numbers) + 1) for key in keys]
        return "[" + ", ".join(map(str, cited)) + "]"

    paragraphs = tuple(
        " ".join(_CITATION.sub(number, block).split())
        for text in descriptions for block in text.split("\n\n") if block.strip()
    )
    return Methods(paragraphs, tuple(reference(key) for key in numbers))


def reference(key: str) -> str:
    """The full reference behind a citation key; a harmonizer's name gives its paper."""
    if key in REFERENCES:
        return REFERENCES[key]
    if key in HARMONIZERS and HARMONIZERS.methods[key].citation:
        return HARMONIZERS.methods[key].citation
    raise KeyError(f"no reference for the citation key '{key}'; add it to REFERENCES")
