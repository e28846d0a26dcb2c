/* Starting CPython inside an nginx worker (see docs and ../shared embedding facts):
 * libpython made RTLD_GLOBAL for C extensions, every signal blocked while Python and its
 * first threads start (they inherit the mask; nginx's thread keeps its own), no Python
 * signal handlers, the GIL released before returning, never finalized. */
#define _GNU_SOURCE
#include <Python.h>
#include <dlfcn.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "amesh.h"
#include "state.h"

#ifndef AMESH_PY_VERSION
#error "AMESH_PY_VERSION (the sys.version number built against) must be defined"
#endif

PyObject *amesh_native_module_create(void);

/* The directory that holds this library (the installed amesh_ext package). */
static int library_dir(char *out, size_t len) {
    Dl_info info;
    if (dladdr((void *)library_dir, &info) == 0 || info.dli_fname == NULL) return -1;
    char path[PATH_MAX];
    if (realpath(info.dli_fname, path) == NULL) snprintf(path, sizeof(path), "%s", info.dli_fname);
    snprintf(out, len, "%s", dirname(path));
    return 0;
}

/* initial()'s settings: amesh.json beside the library as it was loaded (a link to the
 * installed libxds.so may sit in any package.cpath directory), else beside the real file. */
static FILE *open_initial_config(char *path, size_t len) {
    Dl_info info;
    char real[PATH_MAX], dir[PATH_MAX];
    if (dladdr((void *)open_initial_config, &info) != 0 && info.dli_fname) {
        snprintf(dir, sizeof(dir), "%s", info.dli_fname);
        snprintf(path, len, "%s/amesh.json", dirname(dir));
        FILE *f = fopen(path, "rb");
        if (f) return f;
    }
    if (library_dir(real, sizeof(real)) != 0) return NULL;
    snprintf(path, len, "%s/amesh.json", real);
    return fopen(path, "rb");
}

const char *amesh_initial_config(void) {
    static char *config;
    char path[PATH_MAX + 16] = "";
    FILE *f = open_initial_config(path, sizeof(path));
    if (f == NULL) {
        fprintf(stderr, "amesh: initial(): no amesh.json beside the library (last tried %s), "
                        "using the default start config\n", path);
        return "{}";
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    free(config);
    config = size >= 0 ? malloc((size_t)size + 1) : NULL;
    if (config == NULL || fread(config, 1, (size_t)size, f) != (size_t)size) {
        fclose(f);
        amesh_log_error("initial(): cannot read %s", path);
        return NULL;
    }
    fclose(f);
    config[size] = '\0';
    return config;
}

/* The exception text of the current Python error (and clear it). */
static void python_error(const char *what) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *msg = text ? PyUnicode_AsUTF8(text) : NULL;
    amesh_set_error("%s: %s", what, msg ? msg : "unknown Python error");
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
}

/* With the GIL held: make amesh_ext importable from the library's site-packages, register
 * the native module, and hand the config to amesh_ext.bootstrap.start(). */
static int bootstrap(const char *config_json, int mode, const char *pkg_dir) {
    char site_dir[PATH_MAX];
    snprintf(site_dir, sizeof(site_dir), "%s", pkg_dir);
    char *slash = strrchr(site_dir, '/');
    if (slash && slash != site_dir) *slash = '\0'; /* site-packages holds amesh_ext/ */

    PyObject *modules = PyImport_GetModuleDict();
    PyObject *native = amesh_native_module_create();
    if (native == NULL || PyDict_SetItemString(modules, "_amesh_native", native) != 0) {
        Py_XDECREF(native);
        python_error("cannot create the _amesh_native module");
        return AMESH_ERUNTIME;
    }
    Py_DECREF(native);

    PyObject *site = PyImport_ImportModule("site");
    PyObject *r = site ? PyObject_CallMethod(site, "addsitedir", "s", site_dir) : NULL;
    Py_XDECREF(r);
    Py_XDECREF(site);
    PyObject *path = PySys_GetObject("path"); /* borrowed */
    PyObject *dir = PyUnicode_FromString(site_dir);
    if (r == NULL || path == NULL || dir == NULL || PyList_Insert(path, 0, dir) != 0) {
        Py_XDECREF(dir);
        python_error("cannot set sys.path");
        return AMESH_ERUNTIME;
    }
    Py_DECREF(dir);

    PyObject *boot = PyImport_ImportModule("amesh_ext.bootstrap");
    if (boot == NULL) {
        python_error("cannot import amesh_ext.bootstrap");
        return AMESH_ERUNTIME;
    }
    PyObject *res = PyObject_CallMethod(boot, "start", "ssss", config_json,
                                        mode == AMESH_MODE_INITIAL ? "initial" : "poll",
                                        AMESH_PY_VERSION, AMESH_PY_HOME);
    Py_DECREF(boot);
    if (res == NULL) {
        PyObject *type = PyErr_Occurred();
        int config_error = type && PyErr_GivenExceptionMatches(type, PyExc_ValueError);
        python_error("agent not started");
        return config_error ? AMESH_EINVAL : AMESH_ERUNTIME;
    }
    Py_DECREF(res);
    return AMESH_OK;
}

static int check_runtime(const char *home) {
    /* Before initializing: a different libpython (say the system's, picked because the one
     * built against is unreadable to the worker's user) must fail loudly, not half-work. */
    const char *loaded = Py_GetVersion();
    size_t n = strlen(AMESH_PY_VERSION);
    if (strncmp(loaded, AMESH_PY_VERSION, n) != 0 || (loaded[n] != ' ' && loaded[n] != '\0')) {
        amesh_set_error("Python runtime mismatch: built for %s (home %s), loaded libpython %.40s "
                        "(is the runtime readable by uid %d?)",
                        AMESH_PY_VERSION, AMESH_PY_HOME, loaded, (int)geteuid());
        return AMESH_ERUNTIME;
    }
    char os_py[PATH_MAX];
    snprintf(os_py, sizeof(os_py), "%s/lib/python%s/os.py", home, AMESH_PY_SHORT_VERSION);
    if (access(os_py, R_OK) != 0) {
        amesh_set_error("Python runtime at %s is not readable by uid %d (%s)", home,
                        (int)geteuid(), os_py);
        return AMESH_ERUNTIME;
    }
    return AMESH_OK;
}

static int init_interpreter(const char *home) {
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.install_signal_handlers = 0; /* nginx owns the signals */
    config.site_import = 0;             /* bootstrap() adds our site-packages itself */
    config.write_bytecode = 0;          /* workers may not write into site-packages */
    config.buffered_stdio = 0;
    PyStatus status = PyConfig_SetBytesString(&config, &config.home, home);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        amesh_set_error("Python did not start: %s", status.err_msg ? status.err_msg : "?");
        return AMESH_ERUNTIME;
    }
    return AMESH_OK;
}

int amesh_embed_start(const char *config_json, int mode) {
    char pkg_dir[PATH_MAX];
    if (library_dir(pkg_dir, sizeof(pkg_dir)) != 0) {
        amesh_set_error("cannot locate the library with dladdr");
        return AMESH_ERUNTIME;
    }
    if (Py_IsInitialized()) {
        /* Loaded into a running Python (tests, tools): use its interpreter. */
        PyGILState_STATE g = PyGILState_Ensure();
        int rc = bootstrap(config_json, mode, pkg_dir);
        PyGILState_Release(g);
        return rc;
    }
    const char *home = getenv("AMESH_PYTHON_HOME");
    if (home == NULL || home[0] == '\0') home = AMESH_PY_HOME;
    int rc = check_runtime(home);
    if (rc != AMESH_OK) return rc;
    /* C extensions (grpc's cygrpc, _ssl) resolve Python symbols globally. */
    if (dlopen(AMESH_PY_LIBRARY, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL) == NULL) {
        amesh_set_error("cannot make %s global: %s", AMESH_PY_LIBRARY, dlerror());
        return AMESH_ERUNTIME;
    }
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &saved);
    rc = init_interpreter(home);
    if (rc == AMESH_OK) {
        rc = bootstrap(config_json, mode, pkg_dir);
        /* Release the GIL for good: nginx's thread never takes it again. The interpreter is
         * never finalized (a finalize would wait on threads blocked in gRPC). */
        PyEval_SaveThread();
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return rc;
}
