/*
 * Makes the processes it is preloaded into see an AVX2-only x86-64 CPU on an AVX-512 machine:
 * every CPUID instruction traps (Linux's CPUID faulting, arch_prctl(ARCH_SET_CPUID, 0)), and the
 * SIGSEGV handler below runs the real CPUID with the AVX-512 feature bits (leaf 7) cleared.
 * Libraries that choose their kernels by CPUID at run time (ONNX Runtime's MLAS, numpy, Rust's
 * is_x86_feature_detected!, the gemm crate) then take their AVX2 paths, so an engine and ONNX
 * Runtime can be compared as an AVX2-only CPU would run them. The microarchitecture is still
 * the host's (caches, FMA units): this emulates the instruction set, not a Zen 3.
 *
 * Built and used by tools/avx2-only/run.sh. Needs a CPU (or hypervisor) with CPUID faulting
 * (`cpuid_fault` in /proc/cpuinfo); without it the process exits with a message. Child
 * processes inherit LD_PRELOAD and so the mask (execve resets the trap; the constructor sets it
 * again). AVX2_ONLY_VERBOSE=1 reports on exit how many CPUID queries (and of leaf 7) were answered.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static volatile unsigned long queries, leaf7_queries;

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

/* Leaf 7 sub-leaf 0: EBX AVX512F, DQ, IFMA, PF, ER, CD, BW, VL; ECX VBMI, VBMI2, VNNI, BITALG,
 * VPOPCNTDQ; EDX 4VNNIW, 4FMAPS, VP2INTERSECT, FP16. Sub-leaf 1: EAX AVX512_BF16. */
#define EBX_AVX512 ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
#define ECX_AVX512 ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
#define EDX_AVX512 ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23))

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)info;
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {
        /* A real fault: let it kill the process as it would have. */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    queries++;
    set_cpuid(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        b &= ~EBX_AVX512;
        c &= ~ECX_AVX512;
        d &= ~EDX_AVX512;
        leaf7_queries++;
    } else if (leaf == 7 && sub == 1) {
        a &= ~(1u << 5);
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

static void report(void) {
    fprintf(stderr, "avx2-only: pid %d answered %lu CPUID queries, %lu of leaf 7 without AVX-512\n",
            (int)getpid(), queries, leaf7_queries);
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || set_cpuid(0) != 0) {
        perror("avx2-only: CPUID faulting (arch_prctl ARCH_SET_CPUID) is not available here");
        _exit(3);
    }
    if (getenv("AVX2_ONLY_VERBOSE"))
        atexit(report);
}
