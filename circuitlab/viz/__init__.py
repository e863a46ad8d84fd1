"""Viewing attribution graphs: the notebook explorer and the offline HTML export."""

from __future__ import annotations

from .explore import explore
from .html import to_html

__all__ = ["explore", "to_html"]
