"""The checked-in generated code must be exactly what the .proto files produce."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "datacache" / "v1"


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True, capture_output=True
    )
    fresh = tmp_path / "datacache" / "v1"
    expected = sorted(p.name for p in fresh.iterdir())
    checked_in = sorted(p.name for p in GENERATED.iterdir() if p.name.startswith("datacache_pb2"))
    assert checked_in == expected
    stale = [
        name for name in expected if (fresh / name).read_bytes() != (GENERATED / name).read_bytes()
    ]
    assert not stale, f"generated code is stale; run scripts/gen-protos: {stale}"


def test_api_follows_buf_standard_style() -> None:
    from datacache.v1 import datacache_pb2 as pb

    for service in pb.DESCRIPTOR.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0
        assert enum.values[0].name.endswith("_UNSPECIFIED")
