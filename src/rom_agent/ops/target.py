"""The service under validation: its admin API, its chat route and its metrics, plus the
drill switch (fault injection on for a drill only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from rom_agent.ops.client import AdminClient, ApiCallError, Reply, error_of
from rom_agent.ops.steps import Steps, shown

OPERATION = "converse"
FAULT_FLAG = "ENABLE_FAULT_INJECTION"


# ---------------------------------------------------------------------- Prometheus text


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float

    def line(self) -> str:
        """The sample as Prometheus prints it (labels sorted, as prometheus-client does)."""
        labels = ",".join(f'{key}="{value}"' for key, value in sorted(self.labels.items()))
        return (
            f"{self.name}{{{labels}}} {self.value!r}" if labels else f"{self.name} {self.value!r}"
        )


class Samples:
    """Every sample of a /metrics page, parsed by prometheus_client's own text parser (so
    `# HELP`/`# TYPE` comments never count as samples: the Node scripts' vacuous pass came from
    grepping them)."""

    def __init__(self, text: str) -> None:
        self._samples = [
            Sample(sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def series(self, name: str, **labels: str) -> list[Sample]:
        """Samples of `name` whose labels include `labels`."""
        return [
            sample
            for sample in self._samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample with exactly these labels, or None."""
        for sample in self._samples:
            if sample.name == name and dict(sample.labels) == labels:
                return sample.value
        return None

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples matching `labels` (0 when there are none yet)."""
        return sum(sample.value for sample in self.series(name, **labels))


class Target:
    """The service under validation: admin, chat and metrics calls."""

    def __init__(self, client: AdminClient, api_key: str | None = None) -> None:
        self.client = client
        self._api_key = api_key

    @property
    def url(self) -> str:
        return self.client.base_url

    @property
    def has_api_key(self) -> bool:
        return bool(self._api_key)

    def flags(self) -> dict[str, Any]:
        flags: dict[str, Any] = self.client.get_flags()["flags"]
        return flags

    def set_flags(self, changes: Mapping[str, Any], steps: Steps, why: str) -> None:
        result = self.client.set_flags(changes)
        for key, change in result["changed"].items():
            old, new = shown(change["old"]), shown(change["new"])
            steps.action(f"{key}: {old} -> {new} ({why})")

    def metrics(self) -> Samples:
        reply = self.client.request("GET", "/metrics", headers={"Accept": "text/plain"})
        if reply.status != 200:
            raise ApiCallError("GET /metrics failed (is ENABLE_METRICS true?)", status=reply.status)
        try:
            return Samples(reply.text)
        except ValueError as exc:  # the parser's error for anything but the text format
            raise ApiCallError(f"GET /metrics: not Prometheus text ({exc})") from None

    def chat(
        self,
        message: str,
        conversation_id: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Reply:
        sent = dict(headers or {})
        if self._api_key:
            sent["Authorization"] = f"Bearer {self._api_key}"
        body = {"mensagem": message, "conversationId": conversation_id}
        return self.client.request(
            "POST", "/api/chat", body=body, headers=sent, timeout_s=timeout_s
        )


def model_ids(flags: Mapping[str, Any]) -> list[str]:
    """Model ids of MODEL_CHAIN without the provider prefix (what metric labels use)."""
    return [str(entry).partition("/")[2] or str(entry) for entry in flags["MODEL_CHAIN"]]


def describe(reply: Reply) -> str:
    """`502 UPSTREAM_FAILED` or `200`: what a check shows of a chat answer."""
    if reply.ok:
        return str(reply.status)
    error = error_of(reply)
    return f"{reply.status} {error.code}" if error.code else str(reply.status)


@contextlib.contextmanager
def drills(
    target: Target, steps: Steps, *, enable: bool, always_off: bool = False
) -> Iterator[bool]:
    """Yields whether fault injection is on for the drill.

    With `enable`, switches it on if needed and, on the way out (also on failure or Ctrl-C),
    off again if this run switched it on — or in every case with `always_off` (the rollout
    never leaves a service with fault injection on).
    """
    was_on = target.flags()[FAULT_FLAG] is True
    switched = False
    if not was_on and enable:
        target.set_flags({FAULT_FLAG: True}, steps, "drill")
        switched = True
    try:
        yield was_on or switched
    finally:
        if switched or (always_off and was_on):
            _drills_off(target, steps)
        elif was_on:
            steps.info(
                f"{FAULT_FLAG} is still true, as you set it; switch it off after the drills: "
                f"rom-agent flags set {FAULT_FLAG}=false"
            )


def _drills_off(target: Target, steps: Steps) -> None:
    try:
        target.set_flags({FAULT_FLAG: False}, steps, "drill over")
        observed = target.flags()[FAULT_FLAG]
    except ApiCallError as exc:
        observed = f"could not switch it off: {exc}"
    steps.expect(
        "drill", f"{FAULT_FLAG} is back to false", observed=shown(observed), expected="false"
    )
