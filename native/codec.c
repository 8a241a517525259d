/* shmcache._codec: the per-event loops that turn Python objects into ring
 * bytes and ring bytes back into Python objects.
 *
 * Everything that touches the shared segment lives in shmcache.c (the cffi
 * module); this module only reads and builds *local* buffers and Python
 * objects, which cffi cannot return.  Measured on the development VM, the
 * same loops in Python cost 3-4 us per event (put_many) and ~0.8 us per
 * event (a drain into Event objects); here they cost a tenth of that.
 *
 * Both functions are fast paths with a Python reference implementation
 * beside them (shmcache/_writer.py, shmcache/_reader.py): encode_batch()
 * gives up on anything unusual and the caller reruns the Python path, which
 * raises the precise error; decode_events() validates every record against
 * the local buffers it was given and raises ValueError (UnicodeDecodeError
 * for a key that is not UTF-8) on the first one no correct writer produces.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "shmcache.h"

/* encode_batch(items, arena_bytes, max_record) -> (blob, ops) | int
 *
 * items: a sequence of (str key, bytes value | None) pairs.  On success:
 * blob holds each key followed by its value (nothing for a delete), ops one
 * struct sc_batch_op per item.  Returns the index of the first item this fast
 * path does not take (not a pair, a key that is not a str or not valid, a
 * value that is not exactly bytes, a key + value beyond arena_bytes or a
 * record beyond max_record); the caller's Python path decides what that
 * item is. */
static PyObject *encode_batch(PyObject *self, PyObject *args)
{
    PyObject *items, *seq;
    unsigned long long arena_bytes, max_record;
    if (!PyArg_ParseTuple(args, "OKK:encode_batch", &items, &arena_bytes, &max_record))
        return NULL;
    seq = PySequence_Fast(items, "put_many items must be iterable");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **elems = PySequence_Fast_ITEMS(seq);
    uint64_t total = 0;
    Py_ssize_t bad = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = elems[i];
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(it, 0))) {
            bad = i;
            break;
        }
        PyObject *value = PyTuple_GET_ITEM(it, 1);
        Py_ssize_t kl;
        /* cached in the str: a second call below costs nothing */
        if (PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(it, 0), &kl) == NULL) {
            PyErr_Clear(); /* a lone surrogate: the Python path names it */
            bad = i;
            break;
        }
        if (kl == 0 || kl > SC_MAX_KEY_BYTES) {
            bad = i;
            break;
        }
        uint64_t len = (uint64_t)kl;
        if (value != Py_None) {
            if (!PyBytes_CheckExact(value)) {
                bad = i;
                break;
            }
            len += (uint64_t)PyBytes_GET_SIZE(value);
            if (len > arena_bytes || ((len + 31) & ~(uint64_t)7) > max_record) {
                bad = i;
                break;
            }
        }
        total += len;
    }
    if (bad >= 0 || n > (Py_ssize_t)UINT32_MAX) {
        Py_DECREF(seq);
        return PyLong_FromSsize_t(bad >= 0 ? bad : n);
    }
    PyObject *blob = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    PyObject *ops = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(struct sc_batch_op));
    if (blob == NULL || ops == NULL) {
        Py_XDECREF(blob);
        Py_XDECREF(ops);
        Py_DECREF(seq);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(blob);
    struct sc_batch_op *op = (struct sc_batch_op *)PyBytes_AS_STRING(ops);
    for (Py_ssize_t i = 0; i < n; i++, op++) {
        PyObject *it = elems[i], *value = PyTuple_GET_ITEM(it, 1);
        Py_ssize_t kl;
        const char *key = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(it, 0), &kl);
        memcpy(out, key, (size_t)kl);
        out += kl;
        op->key_len = (uint32_t)kl;
        op->reserved = 0;
        if (value == Py_None) {
            op->value_len = 0;
            op->is_delete = 1;
        } else {
            Py_ssize_t vl = PyBytes_GET_SIZE(value);
            memcpy(out, PyBytes_AS_STRING(value), (size_t)vl);
            out += vl;
            op->value_len = (uint32_t)vl;
            op->is_delete = 0;
        }
    }
    Py_DECREF(seq);
    PyObject *result = PyTuple_Pack(2, blob, ops);
    Py_DECREF(blob);
    Py_DECREF(ops);
    return result;
}

/* True when a tuple is just a PyVarObject followed by its items (no cached
 * hash in between): then a tuple subclass instance can be filled in place. */
static int plain_tuple_layout;

/* Builds an instance of cls (a tuple subclass of plain layout or not) from n
 * new references, which it steals (also on failure). */
static PyObject *new_record(PyTypeObject *cls, PyObject **items, Py_ssize_t n)
{
    PyObject *t = plain_tuple_layout ? cls->tp_alloc(cls, n) : PyTuple_New(n);
    if (t == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    if (!plain_tuple_layout) {
        PyObject *converted = PyTuple_Type.tp_new(cls, t, NULL);
        Py_DECREF(t);
        return converted;
    }
    return t;
}


/* Recently decoded keys, direct-mapped by a hash of their UTF-8 bytes: the
 * events of a watch mostly repeat a working set of keys, and handing out the
 * same str again saves a decode and an allocation per event.  Bounded (one
 * str per entry); only touched with the GIL held. */
#define KEY_CACHE_SIZE 4096
static PyObject *key_cache[KEY_CACHE_SIZE];

static PyObject *decode_key(const char *raw, Py_ssize_t len)
{
    if (len > 64) /* long keys are rarer and costlier to compare: decode */
        return PyUnicode_DecodeUTF8(raw, len, "strict");
    uint64_t h = 0xcbf29ce484222325ULL;
    for (Py_ssize_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)raw[i]) * 0x100000001b3ULL;
    PyObject **slot = &key_cache[(h ^ (h >> 29)) & (KEY_CACHE_SIZE - 1)];
    if (*slot != NULL) {
        Py_ssize_t n;
        /* never fails: an entry was decoded from valid UTF-8 (for an ASCII
         * str this is its own data, else a copy made once and kept) */
        const char *utf8 = PyUnicode_AsUTF8AndSize(*slot, &n);
        if (utf8 == NULL)
            PyErr_Clear();
        else if (n == len && memcmp(utf8, raw, (size_t)len) == 0)
            return Py_NewRef(*slot);
    }
    PyObject *key = PyUnicode_DecodeUTF8(raw, len, "strict");
    if (key != NULL)
        Py_XSETREF(*slot, Py_NewRef(key));
    return key;
}

/* decode_events(meta, data, count, last_rv, event_type, types, ordered=True) -> list
 *
 * meta: count struct sc_event_meta records (as sc_ring_copy wrote them);
 * data: each event's key then value, back to back.  Builds event_type (a
 * tuple subclass without instance dict: shmcache.Event) instances
 * (types[type - 1], key str, value bytes, rv).  The records must have rv
 * strictly increasing from last_rv (unless not ordered: a snapshot's events
 * share its rv), a type of 1..3 and lengths inside data, or ValueError; a key
 * that is not UTF-8 raises UnicodeDecodeError. */
static PyObject *decode_events(PyObject *self, PyObject *args)
{
    Py_buffer meta, data;
    Py_ssize_t count;
    unsigned long long last_rv;
    PyTypeObject *cls;
    PyObject *types;
    int ordered = 1;
    if (!PyArg_ParseTuple(args, "y*y*nKO!O!|p:decode_events", &meta, &data, &count, &last_rv,
                          &PyType_Type, &cls, &PyTuple_Type, &types, &ordered))
        return NULL;
    PyObject *list = NULL;
    if (!PyType_IsSubtype(cls, &PyTuple_Type) || cls->tp_basicsize != PyTuple_Type.tp_basicsize
        || PyTuple_GET_SIZE(types) != 3) {
        PyErr_SetString(PyExc_TypeError, "decode_events: event_type must be a plain tuple subclass "
                                         "and types a 3-tuple");
        goto done;
    }
    if (count < 0 || (size_t)count > (size_t)meta.len / sizeof(struct sc_event_meta)) {
        PyErr_Format(PyExc_ValueError, "%zd event records do not fit %zd bytes of metadata", count,
                     meta.len);
        goto done;
    }
    list = PyList_New(count);
    if (list == NULL)
        goto done;
    /* copied out field by field below: the buffer need not be aligned */
    const char *records = (const char *)meta.buf;
    const char *base = (const char *)data.buf;
    uint64_t pos = 0, size = (uint64_t)data.len, prev = last_rv;
    for (Py_ssize_t i = 0; i < count; i++) {
        struct sc_event_meta m;
        memcpy(&m, records + (size_t)i * sizeof m, sizeof m);
        uint64_t rv = m.rv, kl = m.key_len, vl = m.value_len;
        uint32_t type = m.type;
        if (ordered && rv <= prev) {
            PyErr_Format(PyExc_ValueError, "resource versions go backwards (%llu after %llu)",
                         (unsigned long long)rv, (unsigned long long)prev);
            goto fail;
        }
        if (type < SC_ADDED || type > SC_DELETED) {
            PyErr_Format(PyExc_ValueError, "an event of type %u", type);
            goto fail;
        }
        if (kl > size - pos || vl > size - pos - kl) {
            PyErr_SetString(PyExc_ValueError, "an event runs past the copied bytes");
            goto fail;
        }
        prev = rv;
        PyObject *fields[4] = {
            Py_NewRef(PyTuple_GET_ITEM(types, type - 1)),
            decode_key(base + pos, (Py_ssize_t)kl),
            PyBytes_FromStringAndSize(base + pos + kl, (Py_ssize_t)vl),
            PyLong_FromUnsignedLongLong(rv),
        };
        if (fields[1] == NULL || fields[2] == NULL || fields[3] == NULL) {
            for (int f = 0; f < 4; f++)
                Py_XDECREF(fields[f]);
            goto fail;
        }
        PyObject *ev = new_record(cls, fields, 4);
        if (ev == NULL)
            goto fail;
        PyList_SET_ITEM(list, i, ev);
        pos += kl + vl;
    }
    goto done;
fail:
    /* items not yet set are NULL, which list deallocation skips */
    Py_CLEAR(list);
done:
    PyBuffer_Release(&meta);
    PyBuffer_Release(&data);
    return list;
}


/* decode_scan(data, count, into) -> None
 *
 * data: count store records as sc_store_scan wrote them (rv u64, key_len u32,
 * value_len u32, key, value); sets into[key bytes] = (value bytes, rv).
 * ValueError if a record runs past data. */
static PyObject *decode_scan(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t count;
    PyObject *into;
    if (!PyArg_ParseTuple(args, "y*nO!:decode_scan", &data, &count, &PyDict_Type, &into))
        return NULL;
    const char *base = (const char *)data.buf;
    uint64_t pos = 0, size = (uint64_t)data.len;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (size - pos < SC_SCAN_ITEM_HEADER_BYTES) {
            PyErr_SetString(PyExc_ValueError, "a store record runs past the copied bytes");
            goto done;
        }
        uint64_t rv;
        uint32_t kl, vl;
        memcpy(&rv, base + pos, 8);
        memcpy(&kl, base + pos + 8, 4);
        memcpy(&vl, base + pos + 12, 4);
        pos += SC_SCAN_ITEM_HEADER_BYTES;
        if (kl > size - pos || vl > size - pos - kl) {
            PyErr_SetString(PyExc_ValueError, "a store record runs past the copied bytes");
            goto done;
        }
        PyObject *key = PyBytes_FromStringAndSize(base + pos, kl);
        PyObject *value = PyBytes_FromStringAndSize(base + pos + kl, vl);
        PyObject *r = PyLong_FromUnsignedLongLong(rv);
        PyObject *pair = (value && r) ? PyTuple_Pack(2, value, r) : NULL;
        int rc = (key && pair) ? PyDict_SetItem(into, key, pair) : -1;
        Py_XDECREF(key);
        Py_XDECREF(value);
        Py_XDECREF(r);
        Py_XDECREF(pair);
        if (rc < 0)
            goto done;
        pos += (uint64_t)kl + vl;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    return result;
}

struct sort_entry {
    const char *key;
    Py_ssize_t key_len;
    PyObject *key_obj, *value, *rv; /* borrowed from the dict */
};

static int compare_keys(const void *a, const void *b)
{
    const struct sort_entry *x = a, *y = b;
    Py_ssize_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, (size_t)n);
    if (c != 0)
        return c;
    return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

/* items_sorted(items, item_type) -> (list, max_rv)
 *
 * items: {key bytes: (value bytes, rv int)}.  Returns the item_type
 * instances (key str, value, rv) sorted by key — UTF-8 byte order is code
 * point order, so the raw keys are sorted with memcmp before decoding — and
 * the largest rv (0 for none).  UnicodeDecodeError for a key that is not
 * UTF-8.  The dict is walked in its own order (no lookup per key). */
static PyObject *items_sorted(PyObject *self, PyObject *args)
{
    PyObject *items;
    PyTypeObject *cls;
    if (!PyArg_ParseTuple(args, "O!O!:items_sorted", &PyDict_Type, &items, &PyType_Type, &cls))
        return NULL;
    if (!PyType_IsSubtype(cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "items_sorted: item_type must be a tuple subclass");
        return NULL;
    }
    Py_ssize_t n = PyDict_GET_SIZE(items), pos = 0, i = 0;
    struct sort_entry *entries = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *entries);
    if (entries == NULL)
        return PyErr_NoMemory();
    PyObject *k, *pair, *out = NULL;
    unsigned long long max_rv = 0;
    while (PyDict_Next(items, &pos, &k, &pair)) {
        if (i >= n || !PyBytes_Check(k) || !PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "items_sorted: items must map bytes to (value, rv)");
            goto done;
        }
        unsigned long long rv = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(pair, 1));
        if (rv == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        if (rv > max_rv)
            max_rv = rv;
        entries[i++] = (struct sort_entry){PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), k,
                                           PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1)};
    }
    qsort(entries, (size_t)i, sizeof *entries, compare_keys);
    out = PyList_New(i);
    if (out == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < i; j++) {
        PyObject *fields[3] = {
            PyUnicode_DecodeUTF8(entries[j].key, entries[j].key_len, "strict"),
            Py_NewRef(entries[j].value),
            Py_NewRef(entries[j].rv),
        };
        if (fields[0] == NULL) {
            Py_DECREF(fields[1]);
            Py_DECREF(fields[2]);
            Py_CLEAR(out);
            goto done;
        }
        PyObject *item = new_record(cls, fields, 3);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, item);
    }
done:
    PyMem_Free(entries);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(NK)", out, max_rv);
}

static PyMethodDef codec_methods[] = {
    {"encode_batch", encode_batch, METH_VARARGS,
     "encode_batch(items, arena_bytes, max_record) -> (blob, ops) | index of the first item "
     "the fast path does not take"},
    {"decode_events", decode_events, METH_VARARGS,
     "decode_events(meta, data, count, last_rv, event_type, types, ordered=True) -> list of events"},
    {"decode_scan", decode_scan, METH_VARARGS,
     "decode_scan(data, count, into) -> None: into[key] = (value, rv) per store record"},
    {"items_sorted", items_sorted, METH_VARARGS,
     "items_sorted(items, item_type) -> (list of items sorted by key, max rv)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT, "shmcache._codec",
    "Per-event loops between Python objects and ring bytes (local buffers only).", -1,
    codec_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__codec(void)
{
    plain_tuple_layout = offsetof(PyTupleObject, ob_item) == sizeof(PyVarObject);
    return PyModule_Create(&codec_module);
}
