"""Schemathesis fuzzes every operation of the OpenAPI document: no input may cause a 5xx.

Also checked: statuses, content types and bodies conform to the document. The server runs
with small limits so that the valid requests Hypothesis finds stay cheap on a CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

import latentrt
from latentrt.server import Defaults, create_app
from latentrt.service import GenerationService, RequestLimits, ServiceConfig

LIMITS = RequestLimits(max_width=64, max_height=64, max_steps=3, max_batch_size=2, max_input_pixels=256 * 256)


@pytest.fixture(scope="module")
def fuzzed_app() -> Iterator[FastAPI]:
    """The app over the demo model with small limits; its service is shut down after the module."""
    config = ServiceConfig(workers=2, max_queue=16, limits=LIMITS, timeout_s=120)
    service = GenerationService({"latentrt-demo": latentrt.load("demo", progress=False)}, config=config)
    # the fixture owns the service: schemathesis ends the app's lifespan after each test
    yield create_app(service, defaults=Defaults(max_n_iter=2), own_service=False)
    service.shutdown(cancel=True, timeout=30)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_causes_a_server_error(fuzzed_app: FastAPI, mode: GenerationMode) -> None:
    """Every operation, schema-valid (positive) and schema-violating (negative) inputs.

    Hypothesis is driven per operation here rather than through ``schema.parametrize()``,
    whose lazy-fixture form does not run under pytest 9.
    """
    api = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 12
    statuses: Counter[tuple[str, int]] = Counter()
    impossible = []
    for operation in operations:
        try:
            fuzz(operation, mode, statuses)
        except Unsatisfiable:  # nothing in the operation can be made schema-invalid (no body, string-only params)
            assert mode is GenerationMode.NEGATIVE and not operation.body, operation.label
            impossible.append(operation.label)
    print(f"\n{mode.value}: {sum(statuses.values())} calls; statuses {sorted(statuses.items())}")
    print(f"no schema-invalid input possible for {impossible}")
    assert all(status < 500 for _, status in statuses), statuses
    generated = {label for label, status in statuses if status == 200 and "txt2img" in label}
    assert mode is GenerationMode.NEGATIVE or generated, "some fuzzed txt2img requests were valid and ran"


def fuzz(operation: Any, mode: GenerationMode, statuses: Counter[tuple[str, int]]) -> None:
    """Up to 30 Hypothesis examples of ``operation``, each call checked; statuses counted."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        statuses[operation.label, case.call_and_validate(checks=CHECKS).status_code] += 1

    run()
