"""The checksum is CRC-32C (Castagnoli): pin the algorithm with its standard check value."""

from appliance.checksum import crc32c


def test_crc32c_check_value_and_continuation() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the catalogued CRC-32C check value
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")
    assert crc32c(memoryview(b"abc")) == crc32c(bytearray(b"abc"))
