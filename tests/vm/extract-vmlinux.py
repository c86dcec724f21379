#!/usr/bin/env python3
"""extract-vmlinux.py BZIMAGE VMLINUX: write the ELF kernel inside a Debian
bzImage to VMLINUX, for QEMU's PVH boot. Debian's 6.1 kernels carry an XZ
payload, its 6.12 kernels a zstd one (decompressed with the zstd program:
Python's standard library has no zstd). Writes a temporary file and renames
it, so VMLINUX is whole or absent; exits 1 if no payload is an ELF kernel."""
import lzma
import os
import subprocess
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()


def xz(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)


def zstd(blob):
    # zstd complains about what follows the frame (the bzImage's tail) and
    # exits non-zero after writing the whole frame: judge by the output.
    return subprocess.run(["zstd", "-dc"], input=blob, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL).stdout


out = b""
for magic, decompress in ((b"\xfd7zXZ\x00", xz), (b"\x28\xb5\x2f\xfd", zstd)):
    start = data.find(magic)
    if start < 0:
        continue
    try:
        out = decompress(data[start:])
    except (lzma.LZMAError, OSError):
        out = b""
    if out[:4] == b"\x7fELF":
        break
if out[:4] != b"\x7fELF":
    sys.exit(f"{src}: no XZ- or zstd-compressed ELF payload in the bzImage")
with open(dst + ".tmp", "wb") as f:
    f.write(out)
os.replace(dst + ".tmp", dst)
