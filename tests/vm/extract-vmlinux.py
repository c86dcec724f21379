#!/usr/bin/env python3
"""extract-vmlinux.py BZIMAGE VMLINUX: write the ELF kernel inside a Debian
bzImage (its XZ payload) to VMLINUX, for QEMU's PVH boot. Writes a temporary
file and renames it, so VMLINUX is whole or absent; exits 1 if there is no
XZ-compressed ELF payload."""
import lzma
import os
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
start = data.find(b"\xfd7zXZ\x00")
out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:]) if start >= 0 else b""
if out[:4] != b"\x7fELF":
    sys.exit(f"{src}: no XZ-compressed ELF payload in the bzImage")
with open(dst + ".tmp", "wb") as f:
    f.write(out)
os.replace(dst + ".tmp", dst)
