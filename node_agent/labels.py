"""Node labels: ``key: value`` pairs a node carries and a job may require (every one must match).

Bounded as Kubernetes bounds its labels, so that a node's config and a job's request are checked by one rule."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

LABELS_MAX = 32
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([A-Za-z0-9._:+-]{0,61}[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=LABELS_MAX)]

#: Labels every node carries by itself, from its devices: a node's config may not set these.
AUTOMATIC_LABELS = ("device_class", "model", "compute_type")
