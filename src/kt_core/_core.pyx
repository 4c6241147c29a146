# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin bindings over src/kernels: ownership of C++ objects, GIL release, error mapping.

No math; kt_functional validates inputs and passes raw data pointers of tensors it keeps alive
for as long as a job runs. Here only what would crash is checked: no None for an object argument,
tuples of the right length, no use of an empty handle.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid, PyCapsule_New
from libc.stdint cimport int32_t, int64_t, uint16_t, uintptr_t
from libcpp.memory cimport make_shared, shared_ptr
from libcpp.string cimport string
from libcpp.vector cimport vector

cimport kernels as kt


def cpu_features():
    """Raw CPUID/XCR0 feature bits and whether Linux granted AMX to this process."""
    cdef const kt.CpuFeatures* f = &kt.cpu_features()
    return {
        "avx2": f.avx2, "fma": f.fma, "avx512f": f.avx512f, "avx512bw": f.avx512bw,
        "avx512vl": f.avx512vl, "avx512_bf16": f.avx512_bf16, "avx512_vnni": f.avx512_vnni,
        "amx_tile": f.amx_tile, "amx_bf16": f.amx_bf16, "amx_int8": f.amx_int8,
        "amx_granted": f.amx_granted,
    }


def runnable_isas():
    """ISA paths this CPU and this build can run, best first."""
    return [kt.isa_name(i).decode() for i in kt.runnable_isas()]


def default_isa():
    """The best path, or the one KT_ISA forces (RuntimeError naming KT_ISA if it cannot run)."""
    return kt.isa_name(kt.default_isa()).decode()


cdef kt.Isa _isa(str name) except *:
    cdef kt.Isa isa = kt.parse_isa(name.encode())
    kt.kernels_for(isa)  # raises if this CPU or build cannot run it
    return isa


cdef void _free_unconsumed_array(object capsule) noexcept:
    # A capsule that no consumer renamed to "used_dltensor" still owns its array.
    if PyCapsule_IsValid(capsule, b"dltensor"):
        kt.delete_array(<kt.DLManagedTensor*>PyCapsule_GetPointer(capsule, b"dltensor"))


def workspace_f32(tuple shape not None):
    """A DLPack capsule of an uninitialised contiguous fp32 array of `shape` in the kernels' workspace
    memory (for outputs the job writes whole): when its consumer (torch.from_dlpack) frees it, the memory
    goes back to the workspace cache, so the next call's outputs fault no fresh pages."""
    cdef int64_t dims[8]
    if len(shape) > 8:
        raise ValueError(f"shape: expected at most 8 dimensions, got {shape!r}")
    for i, n in enumerate(shape):
        dims[i] = n
    cdef kt.DLManagedTensor* t = kt.workspace_f32_array(dims, len(shape))
    return PyCapsule_New(t, b"dltensor", _free_unconsumed_array)


def release_workspaces():
    """Unmaps the cached per-call workspaces (kept for reuse, bounded by the peak in use at once or KT_WORKSPACE_CACHE_MB); returns the bytes."""
    cdef size_t n
    with nogil:
        n = kt.release_workspaces()
    return n


def kernel_peak(str isa not None, int threads, double seconds=1.0):
    """GFLOP/s of the micro-kernel of `isa` in a tight L1-resident loop on `threads` workers."""
    cdef kt.Isa i = _isa(isa)
    cdef double gflops
    with nogil:
        gflops = kt.kernel_peak_gflops(i, threads, seconds)
    return gflops


cdef class Pool:
    """A persistent worker pool, shared by every user asking for the same thread count, slot and CPUs
    (cpus: the CPUs its workers are pinned to; empty: not pinned)."""
    cdef shared_ptr[kt.Pool] ptr

    def __cinit__(self, int threads, int slot=0, cpus=()):
        cdef vector[int] cpu_list = sorted(cpus)
        self.ptr = kt.shared_pool(threads, slot, cpu_list)

    def __dealloc__(self):
        # The last user of a pool joins its workers after the submitted jobs end: without the GIL,
        # so that other Python threads run meanwhile.
        with nogil:
            self.ptr.reset()

    @property
    def threads(self):
        return self.ptr.get().threads()


cdef kt.Tensor3 _tensor3(tuple spec) except *:
    # spec = (data pointer, dtype code, (stride0, stride1, stride2)) of an [E][rows][cols] tensor
    cdef kt.Tensor3 t
    if len(spec) != 3 or len(spec[2]) != 3:
        raise ValueError(f"expected (data pointer, dtype code, 3 strides), got {spec!r}")
    t.data = <const void*><uintptr_t>spec[0]
    t.dtype = <kt.DType><int>spec[1]
    for i in range(3):
        t.strides[i] = spec[2][i]
    return t


cdef class PackedExperts:
    """Expert weights packed once into VNNI panels (the forward layouts; the backward's operands are
    transposed from them per block, or kept transposed when backward_resident), or into a quantized
    storage's panels (pack_quantized, restore_quantized)."""
    cdef shared_ptr[const kt.PackedExperts] ptr

    def __init__(self, int64_t E, int64_t H, int64_t I, tuple gate not None, tuple up not None,
                 tuple down not None, Pool pool not None, bint backward_resident=False):
        cdef kt.ExpertSource src
        src.gate = _tensor3(gate)
        src.up = _tensor3(up)
        src.down = _tensor3(down)
        cdef kt.Pool* p = pool.ptr.get()
        cdef kt.BackwardWeights bw = kt.BackwardWeights.resident if backward_resident else kt.BackwardWeights.on_the_fly
        with nogil:
            self.ptr = <shared_ptr[const kt.PackedExperts]>make_shared[kt.PackedExperts](E, H, I, src, p[0], bw)

    @property
    def nbytes(self):
        return self.ptr.get().nbytes()

    @property
    def storage(self):
        """Storage code (kt::Storage: 0 bf16, 1 int8, 2 fp8_block, 3 int4_group, 4 mxfp4)."""
        return <int>self.ptr.get().storage

    @property
    def scale_type(self):
        return <int>self.ptr.get().scale_type

    def quantized_bytes(self):
        """A quantized storage's packed bytes (gate_up, down), copied: what restore_quantized takes."""
        cdef const kt.PackedExperts* w = self.ptr.get()
        cdef const kt.ByteBuffer* gu = &w.quantized(kt.Gemm.gate_up)
        cdef const kt.ByteBuffer* d = &w.quantized(kt.Gemm.down)
        return (<const char*>gu.data())[:gu.bytes()], (<const char*>d.data())[:d.bytes()]

    def dequantize(self, uintptr_t gate, uintptr_t up, uintptr_t down):
        """Writes the weights the kernels multiply by, fp32: gate, up [E][I][H], down [E][H][I] (contiguous)."""
        cdef const kt.PackedExperts* w = self.ptr.get()
        cdef int64_t n = w.I * w.H
        cdef int64_t e
        with nogil:
            for e in range(w.E):
                w.dequantize(e, <float*>gate + e * n, <float*>up + e * n, <float*>down + e * n)


cdef kt.QuantSource _quant_source(tuple spec):
    # spec = (codes pointer, scales pointer) of contiguous checkpoint tensors (pack.hpp, QuantSource)
    cdef kt.QuantSource q
    q.codes = <const void*><uintptr_t>spec[0]
    q.scales = <const void*><uintptr_t>spec[1]
    return q


def pack_quantized(int64_t E, int64_t H, int64_t I, int storage, int scale_type, tuple gate, tuple up, tuple down,
                   Pool pool):
    """Packs a quantized checkpoint's gate, up, down (codes, scales pointers; pack.hpp's QuantSource layouts)."""
    cdef kt.QuantizedSource src
    src.storage = <kt.Storage>storage
    src.scale_type = <kt.ScaleType>scale_type
    src.gate = _quant_source(gate)
    src.up = _quant_source(up)
    src.down = _quant_source(down)
    cdef kt.Pool* p = pool.ptr.get()
    cdef PackedExperts out = PackedExperts.__new__(PackedExperts)
    with nogil:
        out.ptr = <shared_ptr[const kt.PackedExperts]>make_shared[kt.PackedExperts](E, H, I, src, p[0])
    return out


def restore_quantized(int64_t E, int64_t H, int64_t I, int storage, int scale_type, bytes gate_up, bytes down):
    """The PackedExperts whose quantized_bytes() were (gate_up, down)."""
    cdef PackedExperts out = PackedExperts.__new__(PackedExperts)
    cdef const unsigned char* gu = gate_up
    cdef const unsigned char* d = down
    out.ptr = <shared_ptr[const kt.PackedExperts]>make_shared[kt.PackedExperts](
        E, H, I, <kt.Storage>storage, <kt.ScaleType>scale_type, gu, len(gate_up), d, len(down))
    return out


def amx_emulator_counters():
    """What the emulated tile unit executed since the last reset, summed over threads.

    Tile registers by operand, as micro_amx.cpp assigns them: C 0-3, A 4-5, B 6-7.
    """
    cdef kt.TileCounters c = kt.emulator_counters()
    return {
        "configs": c.configs, "dot_products": c.dot_products, "zeros": c.zeros,
        "loads_a": c.loads[4] + c.loads[5], "loads_b": c.loads[6] + c.loads[7],
        "loads_c": c.loads[0] + c.loads[1] + c.loads[2] + c.loads[3],
        "stores_c": c.stores[0] + c.stores[1] + c.stores[2] + c.stores[3],
    }


def reset_amx_emulator_counters():
    kt.reset_emulator_counters()


def set_amx_emulator_math(bint on):
    """Off: the emulator checks and counts tile operations but skips their arithmetic (bench proxies)."""
    kt.set_emulator_math(on)


def amx_emulated_tile_dot(uintptr_t c, uintptr_t a, uintptr_t b, tuple shape not None, bint configure=True):
    """Test hook: one TDPBF16PS on the emulated tile unit (see amx_emulator.hpp); RuntimeError on a fault."""
    cdef int s[6]
    if len(shape) != 6:
        raise ValueError(f"shape: expected 6 ints, got {shape!r}")
    for i in range(6):
        s[i] = shape[i]
    kt.emulated_tile_dot(<float*>c, <const uint16_t*>a, <const uint16_t*>b, s, configure)


def pack_panels_f32(str isa not None, uintptr_t src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp,
                    int64_t k_offset, int64_t panel_step, uintptr_t dst, int64_t lo_delta):
    """Test hook: the packer of ISA path `isa` (pack.hpp's pack_panels) on an fp32 matrix, into zeroed bf16
    panels at dst (the caller sizes both buffers)."""
    kt.pack_panels_f32(_isa(isa), <const float*>src, sk, sn, K, N, Kp, k_offset, panel_step, <uint16_t*>dst,
                       lo_delta)


def project_f32(str isa not None, uintptr_t A, int64_t lda, int64_t rows, uintptr_t S, int64_t sk, int64_t sn,
                int64_t K, int64_t N, uintptr_t C, int64_t ldc, uintptr_t S2=0, uintptr_t C2=0):
    """Test hook: the fp32 LoRA project of ISA path `isa` (kernels.hpp's project_f32): C[m][n] = sum_k
    bf16 A[m*lda + k] * S[k*sk + n*sn], and likewise C2 from S2 in lock-step where S2 is given (the caller
    sizes the buffers)."""
    if (S2 == 0) != (C2 == 0):
        raise ValueError("S2, C2: give both or neither")
    kt.project_f32(_isa(isa), <const uint16_t*>A, lda, rows, <const float*>S, <const float*>S2, sk, sn, K, N,
                   <float*>C, <float*>C2, ldc)


def expand_f32(str isa not None, uintptr_t coef, int64_t ldcoef, int64_t rows, uintptr_t S, int64_t sk, int64_t sn,
               int64_t K, int64_t N, uintptr_t C, int64_t ldc):
    """Test hook: the fp32 LoRA expand of ISA path `isa` (kernels.hpp's expand_f32): C[m][n] += sum_k
    coef[m*ldcoef + k] * S[k*sk + n*sn] (the caller sizes the buffers)."""
    kt.expand_f32(_isa(isa), <const float*>coef, ldcoef, rows, <const float*>S, sk, sn, K, N, <float*>C, ldc)


def gemm_t(str isa not None, uintptr_t A, int64_t lda, int64_t rows, uintptr_t B, int64_t panel_stride, int64_t np,
           int64_t nq, uintptr_t C, int64_t ldc, bint accumulate):
    """Test hook: the backward GEMM on the forward panels' transpose of ISA path `isa` (kernels.hpp's
    gemm_t; bf16 A and B as uint16 bits, the caller sizes the buffers)."""
    kt.gemm_t(_isa(isa), <const uint16_t*>A, lda, rows, <const uint16_t*>B, panel_stride, np, nq, <float*>C, ldc,
              accumulate)


CACHE_CONSUMED = "cache: already consumed by a moe_backward; each forward's cache can be used once"


cdef class ForwardCache:
    """Handle to the residuals of one forward call (owned by C++): submit_backward takes them out
    (the backward job frees them when done); otherwise they are freed with this object."""
    cdef shared_ptr[kt.ForwardCache] ptr

    @property
    def consumed(self):
        return not self.ptr

    @property
    def nbytes(self):
        return self.ptr.get().nbytes() if self.ptr else 0


cdef class Job:
    """A submitted forward or backward; wait() releases the GIL."""
    cdef shared_ptr[kt.Job] ptr

    def wait(self):
        if not self.ptr:
            raise ValueError("job: an empty handle (made by submit_forward / submit_backward only)")
        with nogil:
            self.ptr.get().wait()

    def done(self):
        if not self.ptr:
            raise ValueError("job: an empty handle (made by submit_forward / submit_backward only)")
        return self.ptr.get().done()


cdef kt.LoraView _lora(object lora) except *:
    # lora = None or (gate_a, gate_b, up_a, up_b, down_a, down_b pointers, dtype code, rank, scale)
    cdef kt.LoraView v
    if lora is None:
        return v
    if len(lora) != 9:
        raise ValueError(f"lora: expected None or (6 pointers, dtype code, rank, scale), got {lora!r}")
    v.gate_a = <const void*><uintptr_t>lora[0]
    v.gate_b = <const void*><uintptr_t>lora[1]
    v.up_a = <const void*><uintptr_t>lora[2]
    v.up_b = <const void*><uintptr_t>lora[3]
    v.down_a = <const void*><uintptr_t>lora[4]
    v.down_b = <const void*><uintptr_t>lora[5]
    v.dtype = <kt.DType><int>lora[6]
    v.rank = lora[7]
    v.scale = lora[8]
    return v


cdef kt.ExpertVariant _variant(object v) except *:
    # v = None (SwiGLU, no biases) or (gated, activation code, alpha, limit, up_offset, gate_bias, up_bias,
    # down_bias pointers or 0)
    cdef kt.ExpertVariant out
    if v is None:
        return out
    out.gated = v[0]
    out.activation = <kt.Activation><int>v[1]
    out.alpha = v[2]
    out.limit = v[3]
    out.up_offset = v[4]
    out.gate_bias = <const float*><uintptr_t>v[5]
    out.up_bias = <const float*><uintptr_t>v[6]
    out.down_bias = <const float*><uintptr_t>v[7]
    return out


def submit_forward(Pool pool not None, PackedExperts weights not None, str isa not None, uintptr_t x, uintptr_t ids,
                   uintptr_t w, int64_t T, int64_t k, uintptr_t y, int y_dtype, object lora, bint save_for_backward,
                   object variant=None, int part=0, uintptr_t gate_up_out=0, uintptr_t h_in=0):
    """Plans and submits one forward (part 0: the whole layer; 1: gate/up written to gate_up_out; 2: down
    from h_in); returns (Job, ForwardCache or None)."""
    cdef kt.ForwardArgs a
    a.x = <const void*>x
    a.ids = <const int32_t*>ids
    a.w = <const float*>w
    a.T = T
    a.k = k
    a.y = <void*>y
    a.y_dtype = <kt.DType>y_dtype
    a.lora = _lora(lora)
    a.variant = _variant(variant)
    a.save_for_backward = save_for_backward
    a.part = <kt.Part>part
    a.gate_up_out = <float*>gate_up_out
    a.h_in = <const uint16_t*>h_in
    cdef const kt.KernelSet* ks = &kt.kernels_for(_isa(isa))
    cdef shared_ptr[kt.ForwardCache] cache
    cdef Job job = Job.__new__(Job)
    cdef kt.Pool* p = pool.ptr.get()
    with nogil:
        job.ptr = kt.make_forward_job(weights.ptr, ks[0], p.threads(), a, &cache)
        p.submit(job.ptr)
    if not save_for_backward:
        return job, None
    cdef ForwardCache handle = ForwardCache.__new__(ForwardCache)
    handle.ptr = cache
    return job, handle


def submit_backward(Pool pool not None, PackedExperts weights not None, str isa not None,
                    ForwardCache cache not None, uintptr_t gy, uintptr_t dx, int dx_dtype, uintptr_t dw, object lora,
                    tuple lora_grads not None, object variant=None, uintptr_t dh_out=0, uintptr_t dgu_in=0):
    """Consumes the cache and submits one backward over it (of the down part: dh to dh_out; of the gate_up
    part: from dgu_in); returns the Job.

    ValueError(CACHE_CONSUMED) if the cache was consumed already; if the job cannot be made or
    submitted (invalid arguments, no memory) the cache is left unconsumed.
    """
    if len(lora_grads) != 6:
        raise ValueError(f"lora_grads: expected 6 pointers, got {lora_grads!r}")
    cdef kt.BackwardArgs a
    a.gy = <const void*>gy
    a.dx = <void*>dx
    a.dx_dtype = <kt.DType>dx_dtype
    a.dw = <float*>dw
    a.lora = _lora(lora)
    a.variant = _variant(variant)
    a.d_gate_a = <float*><uintptr_t>lora_grads[0]
    a.d_gate_b = <float*><uintptr_t>lora_grads[1]
    a.d_up_a = <float*><uintptr_t>lora_grads[2]
    a.d_up_b = <float*><uintptr_t>lora_grads[3]
    a.d_down_a = <float*><uintptr_t>lora_grads[4]
    a.d_down_b = <float*><uintptr_t>lora_grads[5]
    a.dh_out = <float*>dh_out
    a.dgu_in = <const uint16_t*>dgu_in
    cdef const kt.KernelSet* ks = &kt.kernels_for(_isa(isa))
    cdef Job job = Job.__new__(Job)
    cdef kt.Pool* p = pool.ptr.get()
    cdef shared_ptr[kt.ForwardCache] c = cache.ptr
    # The check and the take run under the GIL with no Python call in between, so of two
    # threads handing in the same cache exactly one gets the residuals.
    if not c:
        raise ValueError(CACHE_CONSUMED)
    cache.ptr.reset()
    try:
        with nogil:
            job.ptr = kt.make_backward_job(weights.ptr, ks[0], p.threads(), <shared_ptr[const kt.ForwardCache]>c, a)
            p.submit(job.ptr)
    except BaseException:  # nothing was submitted: the cache stays usable
        cache.ptr = c
        raise
    return job
