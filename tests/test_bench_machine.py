"""The machine line every benchmark records: the CPU's generation, not only its marketing name."""

from kernels.fftconv.bench import cpu_name

EPYC_VM = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512bw

processor\t: 1
cpu family\t: 25
model name\t: another
"""


def test_cpu_name_names_family_model_and_vector_width_of_the_first_processor():
    assert cpu_name(EPYC_VM) == "AMD EPYC (family 26 model 2, AVX-512)"
    assert cpu_name(EPYC_VM.replace(" avx512f", "")) == "AMD EPYC (family 26 model 2, AVX2)"
    assert cpu_name("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"
    assert cpu_name("processor\t: 0\nBogoMIPS\t: 50.00\n") == ""  # e.g. aarch64: no model name
