"""``python -m lomt_kernels.kernels.triton_group_adam --compile-only [--arch 90]``: build the
kernel for a GPU architecture without a GPU, and print what ptxas says of each variant."""

import argparse

from . import compile_kernels, ptxas_report

parser = argparse.ArgumentParser(description=compile_kernels.__doc__.split("\n\n")[0])
parser.add_argument("--compile-only", action="store_true", required=True)
parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
arch = parser.parse_args().arch
compiled = compile_kernels(arch)
for name, kernel in compiled.items():
    print(name, ptxas_report(kernel.asm["ptx"], arch))
print(f"compiled {len(compiled)} Triton kernel variants")
