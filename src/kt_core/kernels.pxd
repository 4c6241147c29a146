# Declarations of the C++ kernel library (src/kernels) used by _core.pyx.
from libc.stdint cimport int32_t, int64_t, uint16_t, uint64_t
from libcpp cimport bool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "types.hpp" namespace "kt":
    cdef enum class DType(int):
        f32
        bf16

    cdef enum class Storage(int):
        pass

    cdef enum class ScaleType(int):
        pass


cdef extern from "cpu.hpp" namespace "kt":
    cdef enum class Isa(int):
        avx2
        avx512
        amx
        amx_emulated

    cdef cppclass CpuFeatures:
        bool avx2, fma, avx512f, avx512bw, avx512vl, avx512_bf16, avx512_vnni
        bool amx_tile, amx_bf16, amx_int8, os_avx, os_avx512, os_amx, amx_granted

    const CpuFeatures& cpu_features()
    const char* isa_name(Isa)
    Isa parse_isa(const string&) except +
    bool isa_runnable(Isa)
    vector[Isa] runnable_isas()
    Isa default_isa() except +


cdef extern from "common.hpp" namespace "kt":
    size_t release_workspaces() nogil

cdef extern from "dlpack.hpp" namespace "kt":
    cdef cppclass DLManagedTensor:
        pass
    DLManagedTensor* workspace_f32_array(const int64_t*, int) except +
    void delete_array(DLManagedTensor*)


cdef extern from "kernels.hpp" namespace "kt":
    cdef cppclass KernelSet:
        pass

    cdef enum class Activation(int):
        swish
        gelu
        gelu_tanh
        relu
        relu2

    cdef cppclass ExpertVariant:
        bool gated
        Activation activation
        float alpha, limit, up_offset
        const float* gate_bias
        const float* up_bias
        const float* down_bias

    const KernelSet& kernels_for(Isa) except +
    double kernel_peak_gflops(Isa, int, double) except + nogil


cdef extern from "pool.hpp" namespace "kt":
    cdef cppclass Job:
        void wait() nogil
        bool done()

    cdef cppclass Pool:
        int threads() nogil
        void submit(shared_ptr[Job]) except + nogil

    shared_ptr[Pool] shared_pool "kt::Pool::shared"(int, int, const vector[int]&) except +


cdef extern from "common.hpp" namespace "kt":
    cdef cppclass ByteBuffer "kt::Buffer<uint8_t>":
        const unsigned char* data()
        size_t bytes()


cdef extern from "pack.hpp" namespace "kt":
    void pack_panels_f32(Isa, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*,
                         int64_t) except +
    void project_f32(Isa, const uint16_t*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t,
                     int64_t, float*, float*, int64_t) except +
    void expand_f32(Isa, const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                    int64_t) except +
    void gemm_t(Isa, const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t,
                bint) except +

    cdef enum class Gemm(int):
        gate_up
        down

    cdef cppclass QuantSource:
        const void* codes
        const void* scales

    cdef cppclass QuantizedSource "kt::PackedExperts::QuantizedSource":
        Storage storage
        ScaleType scale_type
        QuantSource gate, up, down

    cdef cppclass Tensor3 "kt::PackedExperts::Tensor3":
        const void* data
        DType dtype
        int64_t strides[3]

    cdef cppclass ExpertSource "kt::PackedExperts::Source":
        Tensor3 gate, up, down

    cdef enum class BackwardWeights(int):
        on_the_fly
        resident

    cdef cppclass PackedExperts:
        PackedExperts(int64_t, int64_t, int64_t, const ExpertSource&, Pool&, BackwardWeights) except +
        PackedExperts(int64_t, int64_t, int64_t, const QuantizedSource&, Pool&) except +
        PackedExperts(int64_t, int64_t, int64_t, Storage, ScaleType, const unsigned char*, size_t,
                      const unsigned char*, size_t) except +
        int64_t E, H, I
        Storage storage
        ScaleType scale_type
        size_t nbytes()
        const ByteBuffer& quantized(Gemm)
        void dequantize(int64_t, float*, float*, float*) nogil


cdef extern from "amx_emulator.hpp" namespace "kt::amx":
    cdef cppclass TileCounters:
        uint64_t configs, zeros, dot_products
        uint64_t loads[8]
        uint64_t stores[8]

    TileCounters emulator_counters()
    void reset_emulator_counters()
    void set_emulator_math(bool)
    void emulated_tile_dot(float*, const uint16_t*, const uint16_t*, const int*, bool) except +


cdef extern from "moe.hpp" namespace "kt":
    cdef enum class Part(int):
        whole
        gate_up
        down

    cdef cppclass LoraView:
        const void* gate_a
        const void* gate_b
        const void* up_a
        const void* up_b
        const void* down_a
        const void* down_b
        DType dtype
        int64_t rank
        float scale

    cdef cppclass RoutingPlan:
        int64_t T, k, E, routes

    cdef cppclass ForwardCache:
        RoutingPlan plan
        int64_t rank
        size_t nbytes()

    cdef cppclass ForwardArgs:
        const void* x
        const int32_t* ids
        const float* w
        int64_t T, k
        void* y
        DType y_dtype
        LoraView lora
        ExpertVariant variant
        bool save_for_backward
        Part part
        float* gate_up_out
        const uint16_t* h_in

    cdef cppclass BackwardArgs:
        const void* gy
        void* dx
        DType dx_dtype
        float* dw
        LoraView lora
        ExpertVariant variant
        float* d_gate_a
        float* d_gate_b
        float* d_up_a
        float* d_up_b
        float* d_down_a
        float* d_down_b
        float* dh_out
        const uint16_t* dgu_in

    shared_ptr[Job] make_forward_job(shared_ptr[const PackedExperts], const KernelSet&, int, const ForwardArgs&,
                                     shared_ptr[ForwardCache]*) except + nogil
    shared_ptr[Job] make_backward_job(shared_ptr[const PackedExperts], const KernelSet&, int,
                                      shared_ptr[const ForwardCache], const BackwardArgs&) except + nogil
