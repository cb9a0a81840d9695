"""Efento's NB-IoT messages -> corem's points and attributes (sans-IO: bytes in, values out).

The schema is Efento's published one (the `.proto` files beside this module), read by corem's own
schema reader (corem/profiles/proto_schema.py) into Google's protobuf runtime at first use: no
protoc at run time.

Measurements (`ProtoMeasurements`): each channel has a type, the timestamp of its oldest sample, a
start point and sample offsets.

- A continuous channel's sample i is `start_point + offset[i]`, taken at `timestamp + i * period`,
  scaled by its type (temperature in tenths of a degree, ...).  The period is
  `measurement_period_base * measurement_period_factor`; a factor of 0 (firmware 5.xx) means 1 for a
  sensor with only continuous channels and 14 for a binary or mixed one.  An offset in
  8,355,840-8,388,607 is the sensor's error code, not a value (older firmware: -32768): skipped and
  counted, the channel's other samples kept.
- A binary channel (OK/alarm, flooding, output control) lists state changes: the sign of an offset
  is the state (+ alarm / water / on), `|offset| - 1` its time in seconds after `timestamp`.
- Accumulated counters come in pairs: the major channel (value / 4, the remainder a status) and the
  minor channel (value / 6, the remainder the index of its major channel); the total is
  `major * resolution + minor` at the minor's channel, as ThingsBoard has it.

The samples of every channel become one point per timestamp, keys as ThingsBoard names them
(`temperature_1`, `humidity_2`, `ok_alarm_3`, ...) with their units; the device's status (serial,
battery, signal, next transmission) goes in the point of the first channel's timestamp.  A message
that does not parse, or whose numbers cannot be placed in time, is refused whole (PayloadError,
naming the field as ThingsBoard's JSON printer names it: `channels[1].sampleOffsets`).

Device info and configuration become client attributes; the cloud token (the device's access
token) and the configuration's secrets (keys, the APN password) are never among them.
"""

from __future__ import annotations

import datetime
import functools
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from ...profiles.payload import MAX_TS_MS, PayloadError, Readings
from ...profiles.protobuf import Plan, wire_fault
from ...profiles.proto_schema import pool_of

#: Efento's files, vendored unchanged (README.md beside them says from where)
SCHEMA_DIR = Path(__file__).parent
FILES = ("proto_measurement_types.proto", "proto_measurements.proto", "proto_device_info.proto",
         "proto_config_types.proto", "proto_config_rule.proto", "proto_config.proto")

#: at most this many points from one message (a profile's payload has the same bound)
MAX_POINTS = 1000
#: a continuous sample offset in this range is the sensor's error code (proto_measurements.proto)
SENSOR_ERROR_LOW, SENSOR_ERROR_HIGH = 8_355_840, 8_388_607
#: ... and this one on firmware before 06.00
OLD_SENSOR_ERROR = -32768
#: memory statistics' and timestamps' "undefined"
UNDEFINED_U32 = 0xFFFFFFFF


#: each message and the files its schema is read from (each kind on its own, at its first use:
#: a sensor that sends measurements only never pays for reading the configuration's 85 KB)
MESSAGES = {
    "measurements": ("ProtoMeasurements", ("proto_measurement_types.proto", "proto_measurements.proto")),
    "device_info": ("ProtoDeviceInfo", ("proto_device_info.proto",)),
    "configuration": ("ProtoConfig", ("proto_measurement_types.proto", "proto_config_types.proto",
                                      "proto_config_rule.proto", "proto_config.proto")),
}


@functools.cache
def message_class(kind: str) -> type[Message]:
    """The class of one of Efento's messages (`MESSAGES`), its schema read at the first call."""
    name, files = MESSAGES[kind]
    pool = pool_of({file: (SCHEMA_DIR / file).read_text() for file in files})
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def parse(kind: type[Message], data: bytes) -> Any:
    """One message of `kind`, or PayloadError naming where the bytes break."""
    try:
        return kind.FromString(data)
    except DecodeError:
        fault = wire_fault(data, kind.DESCRIPTOR) or (None, "the bytes do not parse as protobuf")
        raise PayloadError(f"not a {kind.DESCRIPTOR.name} message: {fault[1]}", fault[0]) from None


def serial(raw: bytes) -> str:
    """A serial number as Efento prints it (and ThingsBoard keeps it): upper-case hex."""
    return raw.hex().upper()


# -- measurement types -----------------------------------------------------------------------------
class Continuous(NamedTuple):
    key: str
    #: the value is (start point + offset) / divisor
    divisor: int
    unit: str | None
    #: with metadata: the value is raw / meta and `{key}_metadata_{n}` the remainder (calibration)
    meta: int = 0


class Binary(NamedTuple):
    key: str
    #: what a positive offset means, and a negative one
    positive: str
    negative: str


class Accumulated(NamedTuple):
    key: str
    major: bool
    #: the total's unit: major * resolution + minor
    resolution: int
    unit: str
    major_unit: str


#: MeasurementType number -> how its samples read (proto_measurement_types.proto); keys as
#: ThingsBoard's, and the same pattern for the types ThingsBoard does not read
CONTINUOUS: dict[int, Continuous] = {
    1: Continuous("temperature", 10, "°C"),
    2: Continuous("humidity", 1, "%RH"),
    3: Continuous("pressure", 10, "hPa"),
    4: Continuous("pressure_diff", 1, "Pa"),
    6: Continuous("iaq", 1, "IAQ", meta=3),
    8: Continuous("pulse_cnt", 1, "pulses"),
    9: Continuous("watt_hour", 1, "Wh"),
    10: Continuous("pulse_counter_water", 1, "l"),
    11: Continuous("soil_moisture", 1, "kPa"),
    12: Continuous("co_gas", 1, "ppm"),
    13: Continuous("no2_gas", 1, "ppm"),
    14: Continuous("h2s_gas", 100, "ppm"),
    15: Continuous("ambient_light", 10, "lx"),
    16: Continuous("pm_1_0", 1, "µg/m³"),
    17: Continuous("pm_2_5", 1, "µg/m³"),
    18: Continuous("pm_10_0", 1, "µg/m³"),
    19: Continuous("noise_level", 10, "dB"),
    20: Continuous("nh3_gas", 1, "ppm"),
    21: Continuous("ch4_gas", 1, "ppm"),
    22: Continuous("high_pressure", 1, "kPa"),
    23: Continuous("distance_mm", 1, "mm"),
    26: Continuous("co2_gas", 1, "ppm", meta=3),
    27: Continuous("humidity_relative", 10, "%RH"),
    28: Continuous("static_iaq", 1, "sIAQ", meta=3),
    29: Continuous("co2", 1, "ppm", meta=3),  # CO2 equivalent
    30: Continuous("breath_voc", 1, "ppm", meta=3),
    32: Continuous("percentage", 100, "%"),
    33: Continuous("voltage", 10, "mV"),
    34: Continuous("current", 100, "mA"),
    41: Continuous("current_precise", 1000, "mA"),
    43: Continuous("resistance", 1, "Ω"),
}
BINARY: dict[int, Binary] = {
    5: Binary("ok_alarm", "ALARM", "OK"),
    7: Binary("flooding", "WATER_DETECTED", "OK"),
    42: Binary("output_control", "ON", "OFF"),
}
ACCUMULATED: dict[int, Accumulated] = {
    24: Accumulated("water_cnt_acc", False, 100, "l", "hl"),
    25: Accumulated("water_cnt_acc", True, 100, "l", "hl"),
    35: Accumulated("pulse_cnt_acc", False, 1000, "pulses", "kpulses"),
    36: Accumulated("pulse_cnt_acc", True, 1000, "pulses", "kpulses"),
    37: Accumulated("elec_meter_acc", False, 1000, "Wh", "kWh"),
    38: Accumulated("elec_meter_acc", True, 1000, "Wh", "kWh"),
    39: Accumulated("pulse_cnt_acc_wide", False, 1_000_000, "pulses", "Mpulses"),
    40: Accumulated("pulse_cnt_acc_wide", True, 1_000_000, "pulses", "Mpulses"),
}
MAJOR_META, MINOR_META = 4, 6


def _split(raw: int, by: int) -> tuple[int, int]:
    """(value, metadata): the metadata is the remainder of the absolute value (Efento's words)."""
    q, r = divmod(abs(raw), by)
    return (q if raw >= 0 else -q), r


def _iso(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Measurements(NamedTuple):
    points: list[Readings]
    #: samples not turned into values, by reason (sensor_error, unknown_type, unpaired, invalid)
    skipped: Counter[str]


class _Points:
    """Values by timestamp (ms), with their units."""

    def __init__(self) -> None:
        self.numeric: dict[int, dict[str, float]] = {}
        self.strings: dict[int, dict[str, str]] = {}
        self.units: dict[str, str] = {}

    def number(self, ts: int, key: str, value: float, unit: str | None = None) -> None:
        self.numeric.setdefault(ts, {})[key] = float(value)
        self.strings.setdefault(ts, {})
        if unit is not None:
            self.units[key] = unit

    def text(self, ts: int, key: str, value: str) -> None:
        self.strings.setdefault(ts, {})[key] = value
        self.numeric.setdefault(ts, {})

    def readings(self) -> list[Readings]:
        out = []
        for ts in sorted(self.numeric):
            numeric, strings = self.numeric[ts], self.strings[ts]
            if numeric or strings:
                units = {k: self.units[k] for k in numeric if k in self.units}
                out.append(Readings(numeric, strings, ts, units or None))
        return out


def measurements(msg: Any, now_ms: int) -> Measurements:
    """A parsed ProtoMeasurements -> its points (PayloadError: none of them)."""
    channels = msg.channels
    if not channels:
        raise PayloadError("a measurements message has at least one channel", "channels")
    base, factor = msg.measurement_period_base, msg.measurement_period_factor
    if not factor:  # firmware 5.xx: 14 for a binary or mixed sensor, else 1
        factor = 14 if any(c.type in BINARY for c in channels) else 1
    period_ms = base * factor * 1000
    out = _Points()
    skipped: Counter[str] = Counter()
    minors: list[tuple[int, int, Accumulated, int, int]] = []  # (channel, ts, kind, minor value, major channel)
    for index, channel in enumerate(channels):
        n = index + 1  # the channel's number in the keys
        offsets = channel.sample_offsets
        if not offsets or channel.type == 0:  # MEASUREMENT_TYPE_NO_SENSOR: the slot is empty
            continue
        if channel.timestamp < 0:
            raise PayloadError(f"{channel.timestamp} is before 1970", f"channels[{index}].timestamp")
        start_ms = channel.timestamp * 1000
        binary = BINARY.get(channel.type)
        if binary is not None:
            out.number(start_ms, f"measurement_interval_{n}", base, "s")
            for offset in offsets:
                if offset == 0:  # no sign, so no state
                    skipped["invalid"] += 1
                    continue
                ts = start_ms + (abs(offset) - 1) * 1000
                out.text(ts, f"{binary.key}_{n}", binary.positive if offset > 0 else binary.negative)
            continue
        continuous = CONTINUOUS.get(channel.type)
        accumulated = ACCUMULATED.get(channel.type)
        if continuous is None and accumulated is None:  # a type this schema does not have, or reserved
            skipped["unknown_type"] += len(offsets)
            continue
        if len(offsets) > 1 and not period_ms:
            raise PayloadError("0, yet a channel has several samples to place in time", "measurementPeriodBase")
        last = start_ms + (len(offsets) - 1) * period_ms
        if last > MAX_TS_MS:
            raise PayloadError(f"its samples run past the year 9999 (a period of {period_ms // 1000} s)",
                               f"channels[{index}].timestamp")
        out.number(start_ms, f"measurement_interval_{n}", period_ms // 1000, "s")
        start = channel.start_point
        numeric, strings = out.numeric, out.strings
        # (the hot loop: one key or two per sample, the units named once per channel)
        if continuous is not None:
            key, divisor, meta = f"{continuous.key}_{n}", continuous.divisor, continuous.meta
            meta_key = f"{continuous.key}_metadata_{n}"
            if continuous.unit is not None:
                out.units[key] = continuous.unit
        else:
            assert accumulated is not None
            key, divisor, meta = f"{accumulated.key}_{n}", 1, MAJOR_META if accumulated.major else 0
            meta_key = f"{accumulated.key}_metadata_{n}"
            if accumulated.major:
                out.units[key] = accumulated.major_unit
        for i, offset in enumerate(offsets):
            if SENSOR_ERROR_LOW <= offset <= SENSOR_ERROR_HIGH or offset == OLD_SENSOR_ERROR:
                skipped["sensor_error"] += 1
                continue
            ts = start_ms + i * period_ms
            raw = start + offset
            if accumulated is not None and not accumulated.major:
                value, major = _split(raw, MINOR_META)
                minors.append((n, ts, accumulated, value, major + 1))
                continue
            values = numeric.get(ts)
            if values is None:
                values = numeric[ts] = {}
                strings[ts] = {}
            if meta:
                q, r = _split(raw, meta)
                values[key] = float(q)
                values[meta_key] = float(r)
            else:
                values[key] = raw / divisor
    combined: set[tuple[int, str]] = set()
    for n, ts, accumulated, minor, major in minors:  # after every channel: the major may come later
        major_key = f"{accumulated.key}_{major}"
        major_value = out.numeric.get(ts, {}).get(major_key)
        if major_value is None or major == n:
            skipped["unpaired"] += 1
            continue
        out.number(ts, f"{accumulated.key}_total_{n}", major_value * accumulated.resolution + minor,
                   accumulated.unit)
        combined.add((ts, major_key))
    for ts, key in combined:  # the total replaces the major's own value (ThingsBoard's shape)
        del out.numeric[ts][key]
    # the device's status, in the point of the first channel's oldest sample
    status_ts = channels[0].timestamp * 1000 if channels[0].timestamp > 0 else now_ms
    out.text(status_ts, "serial", serial(msg.serial_number))
    out.text(status_ts, "battery", "ok" if msg.battery_status else "low")
    out.number(status_ts, "signal", msg.signal)
    if msg.next_transmission_at:
        out.text(status_ts, "next_transmission_at",
                 datetime.datetime.fromtimestamp(msg.next_transmission_at, datetime.UTC).strftime(
                     "%Y-%m-%d %H:%M:%S UTC"))
    level = msg.battery_level
    if level:  # firmware 07.00 and later: voltage in hundredths of a volt x 6, plus the power source
        if level <= 65525:
            out.number(status_ts, "battery_voltage", (level // 6) / 100, "V")
        out.text(status_ts, "battery_source", {0: "battery", 1: "rechargeable", 2: "external"}.get(
            level % 6, str(level % 6)))
    points = out.readings()
    if len(points) > MAX_POINTS:
        raise PayloadError(f"{len(points)} points in one message; at most {MAX_POINTS}", "channels")
    return Measurements(points, skipped)


# -- device info -----------------------------------------------------------------------------------
#: memory_statistics, item by item (proto_device_info.proto); True: a timestamp
MEMORY = (
    ("nv_storage_status", False), ("timestamp_of_the_end_of_collecting_statistics", True),
    ("capacity_of_memory_in_bytes", False), ("used_space_in_bytes", False),
    ("size_of_invalid_packets_in_bytes", False), ("size_of_corrupted_packets_in_bytes", False),
    ("number_of_valid_packets", False), ("number_of_invalid_packets", False),
    ("number_of_corrupted_packets", False),
    *((f"number_of_all_samples_for_channel_{i}", False) for i in range(1, 7)),
    ("timestamp_of_the_first_binary_measurement", True), ("timestamp_of_the_last_binary_measurement", True),
    ("timestamp_of_the_last_binary_measurement_sent", True),
    ("timestamp_of_the_first_continuous_measurement", True),
    ("timestamp_of_the_last_continuous_measurement", True),
    ("timestamp_of_the_last_continuous_measurement_sent", True),
    ("nvm_write_counter", False),
)
_BC66 = ("sc_EARFCN", "sc_EARNFCN_offset", "sc_PCI", "sc_Cell_id", "sc_RSRP", "sc_RSRQ", "sc_RSSI", "sc_SINR",
         "sc_Band", "sc_TAC", "sc_ECL", "sc_TX_PWR", "op_mode", "nc_EARFCN", "nc_EARNFCN_offset", "nc_PCI",
         "nc_RSRP", "RLC_UL_BLER", "RLC_DL_BLER", "MAC_UL_BLER", "MAC_DL_BLER", "MAC_UL_TOTAL_BYTES",
         "MAC_DL_TOTAL_BYTES", "MAC_UL_total_HARQ_Tx", "MAC_DL_total_HARQ_Tx", "MAC_UL_HARQ_re_Tx",
         "MAC_DL_HARQ_re_Tx", "RLC_UL_tput", "RLC_DL_tput", "MAC_UL_tput", "MAC_DL_tput", "sleep_duration",
         "rx_time", "tx_time")
#: the modem's runtime parameters by ModemType (the list's meaning depends on the modem)
MODEM_PARAMETERS: dict[int, tuple[str, ...]] = {
    0: _BC66, 1: _BC66, 2: _BC66,
    3: ("RSRP", "RSRQ", "RSSI", "SINR"),  # a shared modem's client
    4: ("sc_EARFCN", "sc_EARNFCN_offset", "sc_PCI", "sc_Cell_id", "sc_RSRP", "sc_RSRQ", "sc_RSSI", "sc_SINR",
        "sc_Band", "sc_TAC", "sc_ECL", "sc_TX_PWR", "op_mode", "nc_EARFCN", "nc_PCI", "nc_RSRP", "nc_RSRQ",
        "sleep_duration", "rx_time", "tx_time", "PLMN_state", "select_PLMN"),  # BC660
}
MODEM_STATISTICS = ("modem_transmissions_count", "modem_time_since_last_devinfo", "modem_total_psm_time",
                    "modem_total_active_time")
MESSAGE_COUNTERS = ("counter_of_confirmable_messages_attempts", "counter_of_non_confirmable_messages_attempts",
                    "counter_of_succeeded_messages")


def device_info(msg: Any) -> dict[str, Any]:
    """A parsed ProtoDeviceInfo -> client attributes (the cloud token left out)."""
    out: dict[str, Any] = {"serial": serial(msg.serial_number), "sw_version": msg.sw_version,
                           "software_version": f"{msg.sw_version >> 8:02d}.{msg.sw_version & 0xFF:02d}"}
    if msg.commit_id:
        out["commit_id"] = msg.commit_id
    for (key, is_time), value in zip(MEMORY, msg.memory_statistics):
        if not is_time:
            out[key] = value
        elif value != UNDEFINED_U32:
            out[key] = _iso(value)
    if msg.HasField("runtime_info"):
        rt = msg.runtime_info
        out["up_time"] = rt.up_time
        out.update(zip(MESSAGE_COUNTERS, rt.message_counters))
        out["mcu_temp"] = rt.mcu_temperature
        out["max_mcu_temp"] = rt.max_mcu_temperature
        out["min_mcu_temp"] = rt.min_mcu_temperature
        if rt.battery_voltage != 0xFFFF:  # 65535: not measured
            out["battery_voltage"] = rt.battery_voltage
        if rt.min_battery_mcu_temperature:  # (06.xx only)
            out["min_battery_mcu_temp"] = rt.min_battery_mcu_temperature
        if rt.battery_reset_timestamp and rt.battery_reset_timestamp != UNDEFINED_U32:  # (06.xx only)
            out["battery_reset_timestamp"] = _iso(rt.battery_reset_timestamp)
        out["runtime_errors"] = len(rt.runtime_errors)
        if rt.runtime_errors:
            out["runtime_error_codes"] = list(rt.runtime_errors)
        out["reset_counter"] = rt.reset_counter
    if msg.HasField("last_update_info"):
        if msg.last_update_info.timestamp:
            out["last_update_check"] = _iso(msg.last_update_info.timestamp)
        out["last_update_status"] = msg.last_update_info.status
    if msg.HasField("modem"):
        modem = msg.modem
        kind = modem.DESCRIPTOR.fields_by_name["type"].enum_type
        out["modem_type"] = kind.values_by_number[modem.type].name if modem.type in kind.values_by_number \
            else modem.type
        version = modem.DESCRIPTOR.fields_by_name["firmware_version"].enum_type
        out["modem_firmware_version"] = (version.values_by_number[modem.firmware_version].name
                                         if modem.firmware_version in version.values_by_number
                                         else modem.firmware_version)
        if modem.sim_card_identification:
            out["sim_card_identification"] = modem.sim_card_identification
        if modem.modem_identification:
            out["modem_identification"] = modem.modem_identification
        out.update(zip(MODEM_STATISTICS, modem.modem_statistics))
        names = MODEM_PARAMETERS.get(modem.type)
        if names is None:  # a modem this schema does not describe: the list as it came
            if modem.parameters:
                out["modem_parameters"] = list(modem.parameters)
        else:
            out.update(zip(names, modem.parameters))
    out["enclosure_tamper_alert"] = msg.enclosure_tamper_alert
    return out


# -- configuration ---------------------------------------------------------------------------------
#: never stored: the device's access token and the configuration's secrets
SECRETS = frozenset({"cloudToken", "encryptionKey", "networkKey", "apnPassword"})
_PLAN = Plan()


def configuration(msg: Any) -> dict[str, Any]:
    """A parsed ProtoConfig -> client attributes: its fields as ThingsBoard's JSON printer names
    them (`measurementPeriodBase`, nested messages as objects, enums by name), secrets left out."""
    return {k: v for k, v in _PLAN.to_dict(msg).items() if k not in SECRETS}
