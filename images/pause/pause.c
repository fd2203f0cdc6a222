/*
 * The sandbox ("pause") process of the local node's pods: it holds the pod's namespaces
 * open, reaps the zombies that end up with it when the pod shares its process namespace,
 * and exits when told to stop. containerd starts it first in every pod (sandbox_image).
 *
 * Built statically by scripts/build-images (gcc -static), so the image holds this one file.
 * SIGINT and SIGTERM end it with status 0; SIGCHLD makes it reap every exited child.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("opsconductor pause 1");
        return 0;
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not PID 1, reaping only my own children\n");
    }
    struct sigaction act;
    memset(&act, 0, sizeof act);
    sigemptyset(&act.sa_mask);
    act.sa_handler = stop;
    if (sigaction(SIGINT, &act, NULL) != 0 || sigaction(SIGTERM, &act, NULL) != 0) {
        perror("pause: sigaction");
        return 1;
    }
    act.sa_handler = reap;
    act.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &act, NULL) != 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
