/* LD_PRELOAD shim: make this process (and its threads) see an AVX2+FMA x86-64 CPU without
 * AVX-512, VNNI, AMX, AVX512-BF16 or GFNI, the way a Zen 3 looks to runtime ISA dispatch.
 *
 * Why: ONNX Runtime's MLAS, OpenVINO's oneDNN fork and its bundled MLAS, numpy and friends pick
 * their kernels from CPUID at run time; MLAS has no switch to cap its ISA. Linux can make CPUID
 * fault (ARCH_SET_CPUID, needs the CPU's "cpuid_fault" feature), so this shim turns CPUID off for
 * the process, answers each trapped CPUID itself with the feature bits above cleared, and returns.
 * Only dispatch is affected: the same silicon then runs AVX2 code, so compare ratios, not times,
 * with a real Zen 3.
 *
 * SIGSEGV handlers the program installs later are kept and chained to (sigaction/signal wrapped),
 * so Python's faulthandler and friends still see real faults.
 *
 * It also sets ARROWVISION_CPU_ISA=avx2, so arrowvision's own view of the CPU (read from
 * /proc/cpuinfo, which CPUID faulting does not change) agrees with the runtimes'.
 *
 * Build and use through benchmarks/emulate_avx2.py (cc -O2 -shared -fPIC ... -ldl).
 * AV_CPUID_MASK_REPORT=1 prints how many CPUIDs were answered at exit (to stderr).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_GET_CPUID
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#endif

/* CPUID.(EAX=7,ECX=0) */
#define L7_EBX_CLEAR ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
/* vbmi, vbmi2, gfni, vnni, bitalg, vpopcntdq */
#define L7_ECX_CLEAR ((1u << 1) | (1u << 6) | (1u << 8) | (1u << 11) | (1u << 12) | (1u << 14))
/* 4vnniw, 4fmaps, vp2intersect, amx_bf16, avx512_fp16, amx_tile, amx_int8 */
#define L7_EDX_CLEAR ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
/* CPUID.(EAX=7,ECX=1): avx_vnni, avx512_bf16, avx_ifma / avx_vnni_int8, avx_ne_convert, avx_vnni_int16 */
#define L71_EAX_CLEAR ((1u << 4) | (1u << 5) | (1u << 23))
#define L71_EDX_CLEAR ((1u << 4) | (1u << 5) | (1u << 10))

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static struct sigaction chained;      /* the program's own SIGSEGV action */
static sigaction_fn real_sigaction;
static atomic_long answered;
static int active;

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void masked_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    set_cpuid(1);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~L7_EBX_CLEAR;
        r[2] &= ~L7_ECX_CLEAR;
        r[3] &= ~L7_EDX_CLEAR;
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~L71_EAX_CLEAR;
        r[3] &= ~L71_EDX_CLEAR;
    } else if (leaf == 0xD && sub == 0) {
        r[0] &= ~0xE0u;  /* XSAVE components: no opmask/ZMM state */
        r[0] &= ~(3u << 17);  /* no AMX tile state */
    }
}

static void forward(int sig, siginfo_t *info, void *context) {
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else {  /* default action: die of this signal as the program would have */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);  /* the fault repeats on return and ends the process */
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (info->si_code == SI_KERNEL && ip && ip[0] == 0x0F && ip[1] == 0xA2) {
        unsigned r[4];
        masked_cpuid((unsigned)regs[REG_RAX], (unsigned)regs[REG_RCX], r);
        regs[REG_RAX] = r[0];
        regs[REG_RBX] = r[1];
        regs[REG_RCX] = r[2];
        regs[REG_RDX] = r[3];
        regs[REG_RIP] += 2;
        atomic_fetch_add(&answered, 1);
        return;
    }
    forward(sig, info, context);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    sigaction_fn real = real_sigaction;
    if (sig != SIGSEGV || !active) return real(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

static void report(void) {
    if (getenv("AV_CPUID_MASK_REPORT"))
        fprintf(stderr, "avx2_cpuid: answered %ld CPUID instructions in pid %d\n", atomic_load(&answered), getpid());
}

__attribute__((constructor)) static void start(void) {
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    chained.sa_handler = SIG_DFL;
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (real_sigaction(SIGSEGV, &act, NULL) != 0 || set_cpuid(0) != 0) {
        fprintf(stderr, "avx2_cpuid: this CPU/kernel cannot fault on CPUID (no cpuid_fault): not emulating\n");
        _exit(86);
    }
    active = 1;
    setenv("ARROWVISION_CPU_ISA", "avx2", 1);
    atexit(report);
}
