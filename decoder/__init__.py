"""Pure kernels: bytes and arrays in, arrays out. No I/O, no logging, no raw values in errors."""
