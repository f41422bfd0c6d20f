"""Finding the Cloud AI 100 SDK: the compiler, its kind, the SDK versions and the card's hardware version.

Facts (../shared/reference/qefficient.md section 2): the compiler is ``<sdk>/exec/qaic-compile`` on current
SDKs and ``<sdk>/exec/qaic-exec`` on older ones; the SDK versions are the ``base_version`` elements of
``<sdk>/versions/apps.xml`` and ``platform.xml``; the hardware version is detected by running
``<sdk>/tools/qaic-util -q`` and looking for ``AIC200`` on its ``FW IMAGE_VARIANT`` lines: QEfficient
upper-cases the variant and reads the first card; qbuild reads the cards the build targets
(``compile.qaic.device_group``, else the first listed), from the output whatever the exit status. Nothing
here imports a heavy library; the one subprocess (qaic-util) runs once per process.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed

DEFAULT_SDK_DIR = "/opt/qti-aic"
COMPILERS = ("qaic-compile", "qaic-exec")
#: used when no card can be asked (no qaic-util, or it fails): the compiler's own default target
DEFAULT_HW_VERSION = "ai100"
#: ``specializations_format: auto`` writes the named format from this Apps SDK version on, the flat one
#: below it and when the version is unknown. QEfficient switched to named specialisations in PR #904
#: (2026-04, first released in QEfficient 1.22) and issue #1129 shows older qaic-compile rejecting them;
#: the reference names no exact SDK version, so the threshold is our choice: the 1.21 Apps SDK, the
#: line QEfficient 1.22 was released against. ``compile.qaic.specializations_format`` overrides it.
NAMED_SPECIALIZATIONS_MIN_SDK = (1, 21)


_FINGERPRINTED = "in the compile key as tool versions (fingerprint())"


@dataclass(frozen=True)
class Sdk:
    """What was found: the compiler, its kind (qaic-compile / qaic-exec) and the SDK versions."""

    compiler: str = unkeyed(why="where the compiler lies; its kind, SDK versions (or digest) are keyed")
    kind: str = unkeyed("qaic-compile", why=_FINGERPRINTED)
    apps_version: str | None = unkeyed(None, why=_FINGERPRINTED)
    platform_version: str | None = unkeyed(None, why=_FINGERPRINTED)
    root: str | None = unkeyed(None, why="where the SDK lies")


def sdk_dir(m: Manifest) -> Path:
    """The SDK root: ``compile.qaic.sdk_dir``, else ``$QAIC_SDK_DIR``, else /opt/qti-aic."""
    return Path(m.compile.qaic.sdk_dir or os.environ.get("QAIC_SDK_DIR") or DEFAULT_SDK_DIR)


def compiler_kind(path: str | Path) -> str:
    """``qaic-exec`` for the older compiler (by file name), else ``qaic-compile``."""
    return "qaic-exec" if "qaic-exec" in Path(path).name else "qaic-compile"


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def looked_for(m: Manifest) -> str:
    """Where discovery looked, for messages."""
    if m.compile.qaic.compiler:
        return f"compile.qaic.compiler={m.compile.qaic.compiler} is not an executable file"
    root = sdk_dir(m)
    origin = ("compile.qaic.sdk_dir" if m.compile.qaic.sdk_dir else
              "$QAIC_SDK_DIR" if os.environ.get("QAIC_SDK_DIR") else "the default SDK location")
    return f"looked for {root}/exec/qaic-compile and {root}/exec/qaic-exec ({origin})"


def find_compiler(m: Manifest) -> Path | None:
    """The compiler: ``compile.qaic.compiler`` or the SDK's qaic-compile, else its qaic-exec."""
    if m.compile.qaic.compiler:
        p = Path(m.compile.qaic.compiler)
        return p if _executable(p) else None
    for name in COMPILERS:
        p = sdk_dir(m) / "exec" / name
        if _executable(p):
            return p
    return None


def read_version(xml_path: Path) -> str | None:
    """The ``base_version`` text of an SDK version file, or None when absent or unreadable."""
    try:
        node = ET.parse(xml_path).getroot().find(".//base_version")
    except (OSError, ET.ParseError):
        return None
    return node.text.strip() if node is not None and node.text else None


def _version_root(m: Manifest, compiler: Path) -> Path:
    """The SDK directory holding ``versions/``: the configured one, else the compiler's ``../..``."""
    root = sdk_dir(m)
    if not (root / "versions").is_dir() and (compiler.parent.parent / "versions").is_dir():
        return compiler.parent.parent
    return root


def discover(m: Manifest) -> Sdk | None:
    """The SDK this manifest would compile with, or None (found once per process and setting)."""
    q = m.compile.qaic
    return _discover(q.compiler, q.sdk_dir, os.environ.get("QAIC_SDK_DIR"))


@cache
def _discover(compiler_setting: str | None, sdk_setting: str | None, env_dir: str | None) -> Sdk | None:
    from qbuild.manifest.schema import CompileSpec, QaicSpec

    m = Manifest(compile=CompileSpec(qaic=QaicSpec(compiler=compiler_setting, sdk_dir=sdk_setting)))
    compiler = find_compiler(m)
    if compiler is None:
        return None
    root = _version_root(m, compiler)
    return Sdk(str(compiler), compiler_kind(compiler), read_version(root / "versions" / "apps.xml"),
               read_version(root / "versions" / "platform.xml"), str(root))


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """``"1.21.2.0"`` -> ``(1, 21, 2, 0)``; None when unparsable."""
    if not version:
        return None
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def specializations_format(m: Manifest, sdk: Sdk | None) -> str:
    """``named`` or ``flat``: the manifest's choice, or by SDK version (see NAMED_SPECIALIZATIONS_MIN_SDK)."""
    wanted = m.compile.qaic.specializations_format
    if wanted != "auto":
        return wanted
    v = version_tuple(sdk.apps_version if sdk else None)
    return "named" if v is not None and v[:2] >= NAMED_SPECIALIZATIONS_MIN_SDK else "flat"


@cache
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; memoised by (path, size, mtime) for the life of the process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(sdk: Sdk) -> dict[str, str]:
    """Tool versions for the compile key: the Apps / Platform SDK versions and the compiler kind.

    Without version files the compiler binary's digest stands in, so a changed compiler still recompiles.
    """
    fp = {"qaic-compiler": sdk.kind}
    if sdk.apps_version or sdk.platform_version:
        fp["qaic-apps-sdk"] = sdk.apps_version or "absent"
        fp["qaic-platform-sdk"] = sdk.platform_version or "absent"
    else:
        st = os.stat(sdk.compiler)
        fp["qaic-compiler-sha256"] = file_sha256(sdk.compiler, st.st_size, st.st_mtime_ns)
    return fp


#: a ``qaic-util -q`` card header (``QID 0``) and its firmware image variant (``FW IMAGE_VARIANT:AIC100_ES``)
_QID = re.compile(r"^\s*QID\s+(\d+)", re.IGNORECASE)
_VARIANT = re.compile(r"^\s*FW\s+IMAGE_VARIANT\s*:\s*(\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class Hardware:
    """What ``-aic-hw-version`` is and how it was found: the cards qaic-util listed and the ones targeted."""

    version: str  # "ai100" | "ai200"
    why: str
    devices: tuple[tuple[int, str | None], ...] = ()  # (QID, FW IMAGE_VARIANT upper-cased) as listed
    targets: tuple[int, ...] = ()  # the QIDs the build targets (compile.qaic.device_group, else the first)


def parse_devices(qaic_util_output: str) -> dict[int, str | None]:
    """QID -> its ``FW IMAGE_VARIANT`` (upper-cased; None when the card shows none), in the order listed.

    Case-insensitive, as QEfficient upper-cases the variant; a variant line before any ``QID`` header
    belongs to card 0."""
    devices: dict[int, str | None] = {}
    current: int | None = None
    for line in qaic_util_output.splitlines():
        qid = _QID.match(line)
        if qid:
            current = int(qid.group(1))
            devices.setdefault(current, None)
            continue
        variant = _VARIANT.match(line)
        if variant:
            card = 0 if current is None else current
            if devices.get(card) is None:
                devices[card] = variant.group(1).upper()
    return devices


def hw_of(variant: str | None) -> str:
    """``ai200`` for an AIC200 image variant, else ``ai100`` (QEfficient's rule)."""
    return "ai200" if variant and "AIC200" in variant.upper() else "ai100"


def parse_hw_version(qaic_util_output: str, device_group: Sequence[int] = ()) -> str:
    """The hardware version of the targeted cards (``device_group``, else the first listed); ``ai100``
    when the output lists none."""
    return select_hardware(parse_devices(qaic_util_output), device_group, "qaic-util -q").version


def select_hardware(devices: dict[int, str | None], device_group: Sequence[int], tool: str) -> Hardware:
    """The targeted cards' hardware version; a targeted card not listed, or mixed AIC100/AIC200 targets,
    is a PlanError (the compiler builds for one version)."""
    listed = tuple(devices.items())
    if not devices:
        return Hardware(DEFAULT_HW_VERSION, f"{tool} listed no card; default {DEFAULT_HW_VERSION}", listed)
    targets = tuple(device_group) or (next(iter(devices)),)
    missing = [d for d in targets if d not in devices]
    if missing:
        from qbuild.errors import PlanError

        raise PlanError(f"compile.qaic.device_group: card(s) {missing} not listed by {tool} "
                        f"(cards: {', '.join(map(str, devices))})",
                        hint="list QIDs that qaic-util -q shows, or set compile.qaic.aic_hw_version")
    versions = {d: hw_of(devices[d]) for d in targets}
    if len(set(versions.values())) > 1:
        from qbuild.errors import PlanError

        shown = ", ".join(f"{d}: {devices[d]}" for d in targets)
        raise PlanError(f"compile.qaic.device_group: the targeted cards differ in hardware ({shown}); one QPC "
                        "is built for one hardware version",
                        hint="target cards of one kind, or set compile.qaic.aic_hw_version")
    shown = ", ".join(f"QID {d} {devices[d] or 'no FW IMAGE_VARIANT'}" for d in targets)
    return Hardware(versions[targets[0]], f"detected by {tool}: {shown}", listed, targets)


@cache
def _qaic_util(qaic_util: str) -> tuple[dict[int, str | None] | None, str]:
    """The cards ``qaic_util -q`` lists (from its output whatever its exit status), or None and why not."""
    if not _executable(Path(qaic_util)):
        return None, f"{qaic_util} not found"
    try:
        proc = subprocess.run([qaic_util, "-q"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{qaic_util} -q failed ({exc})"
    devices = parse_devices(proc.stdout + "\n" + proc.stderr)
    if not devices:
        return None, f"{qaic_util} -q listed no card (exit {proc.returncode})"
    return devices, ""


def detect_hardware(m: Manifest, sdk: Sdk | None) -> Hardware:
    """``compile.qaic.aic_hw_version``, else detected from the targeted cards, else the default."""
    q = m.compile.qaic
    if q.aic_hw_version:
        return Hardware(q.aic_hw_version, "compile.qaic.aic_hw_version")
    root = Path(sdk.root) if sdk and sdk.root else sdk_dir(m)
    tool = str(root / "tools" / "qaic-util")
    devices, why = _qaic_util(tool)
    if devices is None:
        return Hardware(DEFAULT_HW_VERSION, f"{why}; default {DEFAULT_HW_VERSION}")
    return select_hardware(devices, list(q.device_group), f"{tool} -q")


def hw_version(m: Manifest, sdk: Sdk | None) -> tuple[str, str]:
    """(``ai100`` | ``ai200``, why): ``compile.qaic.aic_hw_version``, else detected, else the default."""
    h = detect_hardware(m, sdk)
    return h.version, h.why
