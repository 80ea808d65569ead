"""Shared building blocks of the kvroute.io API: the strict base model, object metadata,
conditions, references, and cross-field rules that exist once in Python and once in CEL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kvroute.io"
VERSION = "v1alpha1"
API_VERSION: Final = "kvroute.io/v1alpha1"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class RuleViolationError(ValueError):
    """A broken cross-field rule; carries the wire path of the field it is about."""

    def __init__(self, message: str, field_path: str | None) -> None:
        super().__init__(message)
        self.field_path = field_path


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, stated twice: as a Python predicate the models enforce, and as the
    CEL expression rendered into the CRD's ``x-kubernetes-validations`` (the API server enforces
    it). ``tests/unit/test_cel_parity.py`` evaluates both on the same objects and requires them
    to agree, so the two statements cannot drift apart."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    reason: Literal["FieldValueInvalid", "FieldValueRequired", "FieldValueForbidden",
                    "FieldValueDuplicate"] = "FieldValueInvalid"

    def crd_entry(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message, "reason": self.reason}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


class ApiModel(BaseModel):
    """Base of every API object part: camelCase wire names, unknown fields rejected (as the API
    server's strict field validation does), and cross-field ``RULES`` enforced after parsing."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_enum_values=True,
    )

    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in self.RULES:
            if not rule.check(self):
                raise RuleViolationError(rule.message, rule.field_path)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest: camelCase keys, unset optionals omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectMeta(BaseModel):
    """The subset of Kubernetes ObjectMeta that kvroute reads. Other standard metadata fields
    (uid, resourceVersion, managedFields, …) are accepted and ignored, as the API server owns
    them."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="Name of the object, unique in its namespace.")
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL,
                                  description="Namespace of the object.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of the object.")
    annotations: dict[str, str] = Field(default_factory=dict,
                                        description="Annotations of the object.")
    generation: int | None = Field(default=None, description="Spec generation (server-set).")


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=r"^[A-Za-z][A-Za-z0-9]*$",
                      description="Type of the condition, e.g. Ready, Accepted, BudgetExhausted.")
    status: Literal["True", "False", "Unknown"] = Field(
        description="Whether the condition holds: True, False or Unknown.")
    reason: str = Field(max_length=1024, pattern=CONDITION_REASON,
                        description="One CamelCase word saying why the condition has its status.")
    message: str = Field(default="", max_length=32768,
                         description="Human-readable details, including what to do about it.")
    last_transition_time: datetime | None = Field(
        default=None, description="When the condition last changed status (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the condition was computed for.")


class LocalObjectReference(ApiModel):
    """A reference to another object in the same namespace, by name."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="Name of the referenced object in the same namespace.")


class SecretKeyReference(ApiModel):
    """A key inside a Secret in the same namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="Name of the Secret in the same namespace.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key inside the Secret whose value is used.")


class ResourceBase(ApiModel):
    """Common envelope of the three kinds: apiVersion, kind, metadata, spec and status."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()

    api_version: Literal["kvroute.io/v1alpha1"] = Field(
        default=API_VERSION, description="APIVersion of this object: kvroute.io/v1alpha1.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")

    @model_validator(mode="before")
    @classmethod
    def _check_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" in data:
            if data["kind"] != cls.KIND:
                raise ValueError(f"kind must be {cls.KIND!r}, got {data['kind']!r}")
            data = {k: v for k, v in data.items() if k != "kind"}
        return data

    def to_wire(self) -> dict[str, Any]:
        body = super().to_wire()
        return {"apiVersion": body.pop("apiVersion"), "kind": self.KIND, **body}
