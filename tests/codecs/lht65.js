// A temperature & humidity sensor in the style of the Dragino LHT65, written as codecs are in the
// TTN device repository (LoRa Alliance TS013 Payload Codec API): 11 bytes,
//   0-1  battery: 2 status bits, 14 bits of millivolts     2-3  temperature, int16 / 100 (°C)
//   4-5  humidity, uint16 / 10 (%RH)                       6    external sensor (1: a probe)
//   7-8  the probe's temperature, int16 / 100, 0x7FFF when unplugged    9-10 reserved
function int16(hi, lo) {
  var v = (hi << 8) | lo;
  return v & 0x8000 ? v - 0x10000 : v;
}

function decodeUplink(input) {
  var b = input.bytes;
  if (b.length !== 11) {
    return { errors: ["expected 11 bytes, got " + b.length] };
  }
  var data = {
    battery_v: (((b[0] << 8) | b[1]) & 0x3fff) / 1000,
    battery_status: ["ultra low", "low", "ok", "good"][b[0] >> 6],
    temperature: int16(b[2], b[3]) / 100,
    humidity: ((b[4] << 8) | b[5]) / 10,
  };
  var warnings = [];
  if (b[6] === 1) {
    var probe = int16(b[7], b[8]);
    if (probe === 0x7fff) warnings.push("the probe is unplugged");
    else data.probe = { temperature: probe / 100 };
  }
  return { data: data, warnings: warnings };
}
