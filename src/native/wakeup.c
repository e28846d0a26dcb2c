/* Event-driven draining for the Lua consumer. The library listens on a unix stream socket;
 * the Lua side connects with a cosocket and blocks in receive inside nginx's event loop.
 * Each queued batch writes one byte to it, so the consumer runs at once instead of at its
 * next poll tick. Only a peer with this process's uid is accepted; the poll timer stays as
 * a safety net, so a lost wakeup only delays a batch, never loses it. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "state.h"

static pthread_mutex_t w_lock = PTHREAD_MUTEX_INITIALIZER; /* guards client_fd */
static int client_fd = -1;
static int listen_fd = -1;
static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

static void unlink_socket(void) {
    if (sock_path[0]) unlink(sock_path);
}

/* nginx waits for the consumer's blocked receive before a worker exits: end it. */
static void shut_client(void) {
    pthread_mutex_lock(&w_lock);
    if (client_fd >= 0) shutdown(client_fd, SHUT_RDWR);
    pthread_mutex_unlock(&w_lock);
}

static void *accept_main(void *arg) {
    (void)arg;
    for (;;) {
        struct pollfd pfd = {.fd = listen_fd, .events = POLLIN};
        int ready = poll(&pfd, 1, 100);
        if (amesh_nginx_exiting()) {
            /* Closing the listener too resets a connection still in its backlog: a consumer
             * that connected just as the worker began to quit would otherwise block in
             * receive with nobody left to shut it, and the worker would never exit. */
            close(listen_fd);
            shut_client();
            return NULL;
        }
        if (ready <= 0) continue;
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN) continue;
            return NULL;
        }
        struct ucred cred;
        socklen_t len = sizeof(cred);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != geteuid()) {
            close(fd);
            continue;
        }
        /* Swap under the lock: a notifier never writes to a descriptor closed (and perhaps
         * reused by nginx) in between. */
        pthread_mutex_lock(&w_lock);
        int old = client_fd;
        client_fd = fd;
        pthread_mutex_unlock(&w_lock);
        if (old >= 0) close(old);
        /* Connected: the path is not needed any more, and a worker killed with -9 would
         * leave it behind. A consumer that loses the connection falls back to polling. */
        unlink_socket();
        sock_path[0] = '\0';
    }
}

int amesh_wakeup_start(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(sock_path, sizeof(sock_path), "/tmp/amesh-%d.sock", (int)getpid());
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", sock_path);
    unlink(sock_path); /* a previous process with this pid left it */
    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 ||
        listen(listen_fd, 4) != 0) {
        amesh_set_error("wakeup socket %s: %s (the consumer polls instead)", sock_path,
                        strerror(errno));
        if (listen_fd >= 0) close(listen_fd);
        listen_fd = -1;
        sock_path[0] = '\0';
        return -1;
    }
    if (amesh_spawn_detached(accept_main) != 0) {
        close(listen_fd);
        listen_fd = -1;
        unlink_socket();
        sock_path[0] = '\0';
        return -1;
    }
    atexit(unlink_socket);
    return 0;
}

const char *amesh_wakeup_path(void) { return sock_path; }

void amesh_wakeup_notify(void) {
    static const char byte = 1;
    pthread_mutex_lock(&w_lock);
    if (client_fd >= 0) {
        /* Non-blocking: a full socket buffer already holds a wakeup. */
        (void)send(client_fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    pthread_mutex_unlock(&w_lock);
}
