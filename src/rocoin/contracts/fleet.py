"""Fleet files: the profile ``(f_d, m_d, r_d, p_d)`` of every edge device (SPEC.md §1)."""

from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from rocoin.contracts.fileio import load_validated, write_text_atomic

#: Bounds of the numbers of a device profile [decision]: wide enough for any real edge device (or
#: a datacentre accelerator standing in for one), narrow enough that every profile number converts
#: to a float and no latency ``c/f + 32·|P|/r + input_bits/b`` or outage can overflow to inf or
#: NaN (the largest term is 2**40 bits at 1 bit/s, about 1.1e12 s).
MIN_FLOPS = 1.0  # 1 FLOP/s: slower than any real device
MAX_FLOPS = 1e18  # 1 EFLOP/s: a whole exascale supercomputer
MIN_RATE_BPS = 1.0  # 1 bit/s, uplink (rate_bps) and downlink (downlink_bps)
MAX_RATE_BPS = 1e12  # 1 Tbit/s: above any single network link (800 GbE)
MIN_MEMORY_BYTES = 1
MAX_MEMORY_BYTES = 2**50  # 1 PiB
MIN_BANDWIDTH_HZ = 1.0
MAX_BANDWIDTH_HZ = 1e12  # 1 THz: above any radio channel
MIN_SNR_DB = -100.0  # linear SNR 1e-10: the device never delivers (refused as outage 1 anyway)
MAX_SNR_DB = 100.0  # linear SNR 1e10: beyond any real link budget
MIN_INPUT_BITS = 1
MAX_INPUT_BITS = 2**40  # 128 GiB for one broadcast input (an image is a few Mbit)

#: Longest device id [decision]: ids go into logs, metrics and error lines; hostnames stop at 63
#: characters per label, UUIDs take 36.
MAX_DEVICE_ID_LENGTH = 128
#: Unicode categories refused anywhere in a device id, with their names for the error: control
#: characters (Cc: \n, \r, ESC, DEL, C1 ...), lone surrogates (Cs, not encodable) and line or
#: paragraph separators (Zl, Zp); any of them would break or forge a log or error line.
FORBIDDEN_ID_CATEGORIES = {"Cc": "control character", "Cs": "lone surrogate", "Zl": "line separator", "Zp": "paragraph separator"}


def check_device_id(value: str) -> str:
    """A device id: 1..MAX_DEVICE_ID_LENGTH characters, printable, no surrounding whitespace."""
    if not value:
        raise ValueError("expected a non-empty device id")
    if len(value) > MAX_DEVICE_ID_LENGTH:
        raise ValueError(f"{len(value)} characters: expected a device id of at most {MAX_DEVICE_ID_LENGTH}")
    # Printable ASCII has none of the forbidden categories: the per-character look-up below
    # (most of the time of validating a 100,000-device fleet) is for the other ids only.
    printable_ascii = value.isascii() and value.isprintable()
    for position, char in enumerate("" if printable_ascii else value):
        kind = FORBIDDEN_ID_CATEGORIES.get(unicodedata.category(char))
        if kind is not None:
            raise ValueError(f"{kind} {char!r} at position {position}: expected a device id without control characters")
    if value != value.strip():
        raise ValueError("leading or trailing whitespace: expected a device id without it")
    return value


#: The type of every device id read from a file (fleet, plan, bundle manifest).
DeviceId = Annotated[str, AfterValidator(check_device_id)]


def rayleigh_outage(rate_bps: float, bandwidth_hz: float, snr_db: float) -> float:
    """``p = 1 - exp(-(2^(r/B) - 1) / gamma)`` with ``gamma`` the linear average SNR."""
    gamma = 10.0 ** (snr_db / 10.0)
    exponent = rate_bps / bandwidth_hz
    if exponent > 1000:  # 2**exponent overflows; the outage is 1 for all purposes
        return 1.0
    return float(-math.expm1(-(2.0**exponent - 1.0) / gamma))


class DeviceProfile(BaseModel):
    """One edge device. Give ``outage`` or (``snr_db`` and ``bandwidth_hz``), not both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: DeviceId = Field(description="unique device id")
    flops: float = Field(ge=MIN_FLOPS, le=MAX_FLOPS, allow_inf_nan=False, description="FLOP/s given to inference")
    memory_bytes: int = Field(ge=MIN_MEMORY_BYTES, le=MAX_MEMORY_BYTES, description="memory for the student: weights + activations")
    rate_bps: float = Field(ge=MIN_RATE_BPS, le=MAX_RATE_BPS, allow_inf_nan=False, description="uplink rate to the source")
    outage: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="P(output does not reach the source in time)",
    )
    snr_db: float | None = Field(default=None, ge=MIN_SNR_DB, le=MAX_SNR_DB, allow_inf_nan=False)
    bandwidth_hz: float | None = Field(default=None, ge=MIN_BANDWIDTH_HZ, le=MAX_BANDWIDTH_HZ, allow_inf_nan=False)
    downlink_bps: float | None = Field(default=None, ge=MIN_RATE_BPS, le=MAX_RATE_BPS, allow_inf_nan=False)
    address: str | None = Field(default=None, description="host:port of the device worker")

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port with a port in 1..65535")
        return value

    @model_validator(mode="before")
    @classmethod
    def _outage_from_channel(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        has_outage = data.get("outage") is not None
        has_snr = data.get("snr_db") is not None
        has_bw = data.get("bandwidth_hz") is not None
        if has_outage and (has_snr or has_bw) and not _outage_matches_channel(data):
            raise ValueError("give either outage or snr_db with bandwidth_hz, not both")
        if not has_outage:
            if not (has_snr and has_bw):
                raise ValueError("outage is required (or give snr_db and bandwidth_hz)")
            try:
                rate, bw, snr = float(data["rate_bps"]), float(data["bandwidth_hz"]), float(data["snr_db"])
            except (KeyError, TypeError, ValueError, OverflowError):
                return data  # the field validators report the bad field
            in_range = (
                MIN_RATE_BPS <= rate <= MAX_RATE_BPS and MIN_BANDWIDTH_HZ <= bw <= MAX_BANDWIDTH_HZ and MIN_SNR_DB <= snr <= MAX_SNR_DB
            )
            if in_range:  # else the field validators report the value out of range
                p = rayleigh_outage(rate, bw, snr)
                if p >= 1.0:
                    raise ValueError(
                        f"snr_db={snr} and bandwidth_hz={bw} give outage {p:.6g} at rate_bps={rate}:"
                        " the device never delivers (expected an outage below 1)"
                    )
                data = {**data, "outage": p}
        return data


def _outage_matches_channel(data: dict[str, Any]) -> bool:
    """Whether a profile that gives both ``outage`` and the channel (``snr_db``, ``bandwidth_hz``)
    gives the very outage the channel implies: what a saved profile holds, so it loads again."""
    try:
        rate, bw, snr, outage = (float(data[k]) for k in ("rate_bps", "bandwidth_hz", "snr_db", "outage"))
        return math.isclose(outage, rayleigh_outage(rate, bw, snr), rel_tol=1e-9, abs_tol=1e-12)
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError):
        return False


class Fleet(BaseModel):
    """The edge devices and, optionally, the size of one broadcast input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[DeviceProfile] = Field(min_length=1)
    input_bits: int | None = Field(default=None, ge=MIN_INPUT_BITS, le=MAX_INPUT_BITS, description="size of one broadcast input")

    @field_validator("devices")
    @classmethod
    def _unique_ids(cls, devices: list[DeviceProfile]) -> list[DeviceProfile]:
        seen: set[str] = set()
        for device in devices:
            if device.id in seen:
                raise ValueError(f"duplicate device id {device.id!r} (ids must be unique)")
            seen.add(device.id)
        return devices

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def arrays(self) -> FleetArrays:
        return FleetArrays.from_fleet(self)

    def to_yaml(self) -> str:
        # libyaml's emitter where PyYAML has it: the same text, a 100,000-device fleet in seconds, not ~45 s.
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return yaml.dump(self.model_dump(mode="json", exclude_none=True), Dumper=dumper, sort_keys=False)


@dataclass(frozen=True)
class FleetArrays:
    """Column view of a fleet for vectorised planning and simulation."""

    ids: tuple[str, ...]
    flops: np.ndarray
    memory_bytes: np.ndarray
    rate_bps: np.ndarray
    outage: np.ndarray
    #: seconds to receive the broadcast input (0 when no downlink rate or input size is given)
    input_s: np.ndarray

    @classmethod
    def from_fleet(cls, fleet: Fleet) -> FleetArrays:
        devices = fleet.devices
        input_s = np.array([fleet.input_bits / d.downlink_bps if (fleet.input_bits and d.downlink_bps) else 0.0 for d in devices])
        return cls(
            ids=tuple(d.id for d in devices),
            flops=np.array([d.flops for d in devices], dtype=float),
            memory_bytes=np.array([d.memory_bytes for d in devices], dtype=float),
            rate_bps=np.array([d.rate_bps for d in devices], dtype=float),
            outage=np.array([d.outage for d in devices], dtype=float),
            input_s=input_s,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> FleetArrays:
        index = np.asarray(index, dtype=int)
        return FleetArrays(
            ids=tuple(self.ids[i] for i in index),
            flops=self.flops[index],
            memory_bytes=self.memory_bytes[index],
            rate_bps=self.rate_bps[index],
            outage=self.outage[index],
            input_s=self.input_s[index],
        )


def load_fleet(path: str | os.PathLike[str]) -> Fleet:
    return load_validated(Fleet, path, "a mapping with a 'devices' list")


def save_fleet(fleet: Fleet, path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, fleet.to_yaml())
