/* _amesh_native: the agent's side of the queue, status and reports (Python → C). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "amesh.h"
#include "queue.h"
#include "state.h"

static int append(amesh_msg_t **head, amesh_msg_t **tail, size_t *count, amesh_msg_t *m) {
    if (m == NULL) return -1;
    if (*tail) (*tail)->next = m;
    else *head = m;
    *tail = m;
    (*count)++;
    return 0;
}

/* push_batch(batch, flags, changes: list[(bytes, bytes | None)]) -> int
 * Queues BEGIN, the changes in the agent's order (a None value is a DELETE) and COMMIT as
 * one atomic append. The order is the agent's (docs/dict-protocol.md): index pre-images,
 * sets, deletes, index post-images, the change log. */
static PyObject *push_batch(PyObject *self, PyObject *args) {
    unsigned long long batch;
    unsigned int flags;
    PyObject *changes;
    if (!PyArg_ParseTuple(args, "KIO!", &batch, &flags, &PyList_Type, &changes)) return NULL;
    amesh_msg_t *head = NULL, *tail = NULL;
    size_t count = 0;
    int bad = append(&head, &tail, &count,
                     amesh_msg_new(AMESH_OP_BEGIN, flags, batch, NULL, 0, NULL, 0));
    for (Py_ssize_t i = 0; !bad && i < PyList_GET_SIZE(changes); i++) {
        char *k, *v = NULL;
        Py_ssize_t kl, vl = 0;
        PyObject *value;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(changes, i), "y#O", &k, &kl, &value) ||
            (value != Py_None && PyBytes_AsStringAndSize(value, &v, &vl) != 0)) {
            amesh_msg_free_list(head);
            return NULL;
        }
        int op = value == Py_None ? AMESH_OP_DELETE : AMESH_OP_SET;
        bad = append(&head, &tail, &count,
                     amesh_msg_new(op, 0, batch, k, (size_t)kl, v, (size_t)vl));
    }
    if (!bad)
        bad = append(&head, &tail, &count,
                     amesh_msg_new(AMESH_OP_COMMIT, flags, batch, NULL, 0, NULL, 0));
    if (bad) {
        amesh_msg_free_list(head);
        return PyErr_NoMemory();
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = amesh_queue_push(head, tail, count);
    Py_END_ALLOW_THREADS return PyLong_FromLong(rc);
}

/* wait_reports(timeout_ms) -> list[(batch, status, message)], waiting without the GIL. */
static PyObject *wait_reports(PyObject *self, PyObject *args) {
    int timeout_ms;
    if (!PyArg_ParseTuple(args, "i", &timeout_ms)) return NULL;
    amesh_report_t reports[64];
    int n;
    Py_BEGIN_ALLOW_THREADS n = amesh_reports_wait(reports, 64, timeout_ms);
    Py_END_ALLOW_THREADS PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        /* A consumer's message may be cut anywhere or be no UTF-8 at all: never raise. */
        PyObject *msg = PyUnicode_DecodeUTF8(reports[i].message,
                                             (Py_ssize_t)strlen(reports[i].message), "replace");
        PyObject *t = msg ? Py_BuildValue("(KiN)", (unsigned long long)reports[i].batch,
                                          reports[i].status, msg)
                          : NULL;
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static PyObject *set_status(PyObject *self, PyObject *args) {
    const char *json;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "y#", &json, &len)) return NULL;
    amesh_set_agent_status(json, (size_t)len);
    Py_RETURN_NONE;
}

static PyObject *log_error(PyObject *self, PyObject *args) {
    const char *msg;
    if (!PyArg_ParseTuple(args, "s", &msg)) return NULL;
    amesh_log_error("%s", msg);
    Py_RETURN_NONE;
}

static PyObject *queue_depth(PyObject *self, PyObject *unused) {
    return PyLong_FromSize_t(amesh_queue_depth());
}

static PyObject *dict_capacity(PyObject *self, PyObject *unused) {
    return PyLong_FromSize_t(amesh_dict_capacity_get());
}

static PyMethodDef methods[] = {
    {"push_batch", push_batch, METH_VARARGS, "Queue one batch of changes."},
    {"wait_reports", wait_reports, METH_VARARGS, "Consumer verdicts on batches."},
    {"set_status", set_status, METH_VARARGS, "Publish the agent's status JSON."},
    {"log_error", log_error, METH_VARARGS, "Record an error (last_error and stderr)."},
    {"queue_depth", queue_depth, METH_NOARGS, "Messages waiting in the queue."},
    {"dict_capacity", dict_capacity, METH_NOARGS, "The data dict's bytes (0: unknown)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT, .m_name = "_amesh_native", .m_size = -1, .m_methods = methods};

PyObject *amesh_native_module_create(void) {
    PyObject *m = PyModule_Create(&module_def);
    if (m && PyModule_AddIntConstant(m, "ABI_VERSION", AMESH_ABI_VERSION) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
