/* Counts calls to CPython's memory allocators; bench/call_work.py builds and loads it.
 *
 * install() wraps the raw, mem and object allocators of the running interpreter (hooks
 * on top of what is there, as PyMem_SetAllocator allows after start-up); allocations()
 * returns how many malloc, calloc and realloc calls each domain has had since. Every
 * thread counts: measure a process whose other threads are idle.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyMemAllocatorEx originals[3];
static unsigned long long counts[3];

#define COUNTING(domain)                                                                   \
    static void *malloc_##domain(void *ctx, size_t n) {                                    \
        __atomic_fetch_add(&counts[domain], 1, __ATOMIC_RELAXED);                          \
        return originals[domain].malloc(originals[domain].ctx, n);                         \
    }                                                                                      \
    static void *calloc_##domain(void *ctx, size_t k, size_t n) {                          \
        __atomic_fetch_add(&counts[domain], 1, __ATOMIC_RELAXED);                          \
        return originals[domain].calloc(originals[domain].ctx, k, n);                      \
    }                                                                                      \
    static void *realloc_##domain(void *ctx, void *p, size_t n) {                          \
        __atomic_fetch_add(&counts[domain], 1, __ATOMIC_RELAXED);                          \
        return originals[domain].realloc(originals[domain].ctx, p, n);                     \
    }                                                                                      \
    static void free_##domain(void *ctx, void *p) {                                        \
        originals[domain].free(originals[domain].ctx, p);                                  \
    }

COUNTING(0)
COUNTING(1)
COUNTING(2)

static int installed;

static PyObject *install(PyObject *self, PyObject *unused) {
    if (!installed) {
        PyMemAllocatorEx counting[3] = {
            {NULL, malloc_0, calloc_0, realloc_0, free_0},
            {NULL, malloc_1, calloc_1, realloc_1, free_1},
            {NULL, malloc_2, calloc_2, realloc_2, free_2},
        };
        for (int d = 0; d < 3; d++) {
            PyMem_GetAllocator((PyMemAllocatorDomain)d, &originals[d]);
            PyMem_SetAllocator((PyMemAllocatorDomain)d, &counting[d]);
        }
        installed = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *allocations(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KKK)", __atomic_load_n(&counts[0], __ATOMIC_RELAXED),
                         __atomic_load_n(&counts[1], __ATOMIC_RELAXED),
                         __atomic_load_n(&counts[2], __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, "Start counting allocations (once per process)."},
    {"allocations", allocations, METH_NOARGS, "(raw, mem, object) allocations since install()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "alloc_count", NULL, -1, methods};

PyMODINIT_FUNC PyInit_alloc_count(void) { return PyModule_Create(&module); }
