/* What one sleep and wake-up costs a thread in CPU time on this machine.
 *
 * A server paced at 1,000 calls/s sleeps in epoll between most events; at saturation it
 * hardly ever does. This times (getrusage, the thread's own user + system time) the bare
 * cycle, with no work between: a thread that sleeps 1 ms in nanosleep (woken by its own
 * timer), and a thread in epoll_wait woken every 1 ms by an eventfd another thread writes
 * (as a request or a worker's answer wakes the server), with epoll's timeout infinite,
 * 100 ms (an armed timer far off) and 5 ms (an armed timer near, as the audit window's is
 * while a batch gathers). Each case runs twice, interleaved.
 *
 * Build and run:  cc -O2 -pthread -o .bench/wake_cost bench/wake_cost.c && .bench/wake_cost
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

enum { WAKES = 3000 };

static int event_fd;

static double thread_cpu_us(void)
{
    struct rusage r;
    getrusage(RUSAGE_THREAD, &r);
    return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e6 + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
}

static void *waker(void *unused)
{
    (void)unused;
    const struct timespec gap = {0, 1000000};
    for (;;) {
        nanosleep(&gap, NULL);
        uint64_t one = 1;
        if (write(event_fd, &one, sizeof one) != sizeof one)
            return NULL;
    }
}

static double nanosleep_cycle(void)
{
    const struct timespec gap = {0, 1000000};
    double start = thread_cpu_us();
    for (int i = 0; i < WAKES; i++)
        nanosleep(&gap, NULL);
    return (thread_cpu_us() - start) / WAKES;
}

static double epoll_cycle(int epoll_fd, int timeout_ms)
{
    double start = thread_cpu_us();
    for (int i = 0; i < WAKES; i++) {
        struct epoll_event ready;
        uint64_t count;
        if (epoll_wait(epoll_fd, &ready, 1, timeout_ms) == 1 &&
            read(event_fd, &count, sizeof count) != sizeof count)
            return -1;
    }
    return (thread_cpu_us() - start) / WAKES;
}

int main(void)
{
    event_fd = eventfd(0, EFD_NONBLOCK);
    int epoll_fd = epoll_create1(0);
    struct epoll_event watch = {.events = EPOLLIN};
    if (event_fd < 0 || epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, event_fd, &watch)) {
        perror("eventfd/epoll");
        return 1;
    }
    double sleeps[2];
    for (int round = 0; round < 2; round++)
        sleeps[round] = nanosleep_cycle();
    pthread_t thread;
    if (pthread_create(&thread, NULL, waker, NULL)) {
        perror("pthread_create");
        return 1;
    }
    const int timeouts[] = {-1, 100, 5};
    double woken[3][2];
    for (int round = 0; round < 2; round++)
        for (int t = 0; t < 3; t++)
            woken[t][round] = epoll_cycle(epoll_fd, timeouts[t]);
    printf("µs of the thread's CPU per sleep and wake-up (two rounds)\n");
    printf("  nanosleep 1 ms, woken by its timer          %6.1f %6.1f\n", sleeps[0], sleeps[1]);
    for (int t = 0; t < 3; t++)
        printf("  epoll_wait (timeout %4d ms), eventfd wakes %6.1f %6.1f\n", timeouts[t],
               woken[t][0], woken[t][1]);
    return 0;
}
