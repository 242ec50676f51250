"""Writes one .cu file per (dtype, activation, pre-activation store) of the
sm_90a forward (dense_forward_sm90.cuh), so that nvcc compiles them in
parallel, and the dispatcher's list of them. Run from anywhere after changing
the lists below; the files are committed."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"bf16": "cutlass::bfloat16_t", "f16": "cutlass::half_t"}
# The non-gated activations (gated ones stay on the mma.sync kernel).
ACTIVATIONS = {"none": "kNone", "relu": "kReLU", "gelu": "kGELU", "gelu_tanh": "kGELUTanh", "silu": "kSiLU",
               "sigmoid": "kSigmoid", "tanh": "kTanh"}
# Those whose backward needs the pre-activation (the others derive it from the output).
WITH_PREACT = ("gelu", "gelu_tanh", "silu")


def instances():
    for dtype in DTYPES:
        for act in ACTIVATIONS:
            yield dtype, act, False
            if act in WITH_PREACT:
                yield dtype, act, True


def spelled(dtype, act, preact):
    return f"DenseGemm<{DTYPES[dtype]}, Activation::{ACTIVATIONS[act]}, {'true' if preact else 'false'}>"


def main():
    for old in os.listdir(HERE):
        if old.startswith("dense_forward_sm90_") and old.endswith(".cu"):
            os.remove(os.path.join(HERE, old))
    for dtype, act, preact in instances():
        name = f"dense_forward_sm90_{dtype}_{act}{'_preact' if preact else ''}.cu"
        with open(os.path.join(HERE, name), "w") as f:
            f.write("// Written by generate_instantiations.py: one instantiation per file.\n"
                    '#include "dense/cuda/sm90/dense_forward_sm90.cuh"\n\n'
                    "namespace bigkernels {\nnamespace cuda {\nnamespace sm90 {\n"
                    f"template struct {spelled(dtype, act, preact)};\n"
                    "}  // namespace sm90\n}  // namespace cuda\n}  // namespace bigkernels\n")
    with open(os.path.join(HERE, "instantiations.inc"), "w") as f:
        f.write("// Written by generate_instantiations.py: BK_SM90_INSTANCE(dtype, activation, store_preact)\n"
                "// for every instantiation, each compiled in its own .cu file.\n")
        for dtype, act, preact in instances():
            f.write(f"BK_SM90_INSTANCE({DTYPES[dtype]}, Activation::{ACTIVATIONS[act]}, {'true' if preact else 'false'})\n")


if __name__ == "__main__":
    main()
