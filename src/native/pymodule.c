/* _amesh_native: the agent's side of the queue, status and reports (Python → C). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

/* push_batch(batch, flags, sets: list[(bytes, bytes)], deletes: list[bytes]) -> int
 * Queues BEGIN, the sets, the deletes and COMMIT as one atomic append. */
static PyObject *push_batch(PyObject *self, PyObject *args) {
    unsigned long long batch;
    unsigned int flags;
    PyObject *sets, *deletes;
    if (!PyArg_ParseTuple(args, "KIO!O!", &batch, &flags, &PyList_Type, &sets, &PyList_Type,
                          &deletes))
        return NULL;
    amesh_msg_t *head = NULL, *tail = NULL;
    size_t count = 0;
    int bad = append(&head, &tail, &count,
                     amesh_msg_new(AMESH_OP_BEGIN, flags, batch, NULL, 0, NULL, 0));
    for (Py_ssize_t i = 0; !bad && i < PyList_GET_SIZE(sets); i++) {
        char *k, *v;
        Py_ssize_t kl, vl;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(sets, i), "y#y#", &k, &kl, &v, &vl)) {
            amesh_msg_free_list(head);
            return NULL;
        }
        bad = append(&head, &tail, &count,
                     amesh_msg_new(AMESH_OP_SET, 0, batch, k, (size_t)kl, v, (size_t)vl));
    }
    for (Py_ssize_t i = 0; !bad && i < PyList_GET_SIZE(deletes); i++) {
        char *k;
        Py_ssize_t kl;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(deletes, i), &k, &kl) != 0) {
            amesh_msg_free_list(head);
            return NULL;
        }
        bad = append(&head, &tail, &count,
                     amesh_msg_new(AMESH_OP_DELETE, 0, batch, k, (size_t)kl, NULL, 0));
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
        PyObject *t = Py_BuildValue("(Kis)", (unsigned long long)reports[i].batch,
                                    reports[i].status, reports[i].message);
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

static PyMethodDef methods[] = {
    {"push_batch", push_batch, METH_VARARGS, "Queue one batch of changes."},
    {"wait_reports", wait_reports, METH_VARARGS, "Consumer verdicts on batches."},
    {"set_status", set_status, METH_VARARGS, "Publish the agent's status JSON."},
    {"log_error", log_error, METH_VARARGS, "Record an error (last_error and stderr)."},
    {"queue_depth", queue_depth, METH_NOARGS, "Messages waiting in the queue."},
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
