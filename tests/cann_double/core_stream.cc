// Streams (asynchronous in-order queues, one worker thread each) and events.
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <set>
#include <thread>

#include "core.h"

namespace cann_double {
namespace {

struct Stream {
  Context* context = nullptr;
  int device = -1;
  std::mutex mutex;
  std::condition_variable work_ready;
  std::condition_variable progress;
  std::deque<StreamTask> queue;
  uint64_t submitted = 0;
  uint64_t completed = 0;
  // The first failure since the last synchronization.
  int error = 0;
  std::string error_message;
  bool stopping = false;
  std::thread worker;
};

struct Event {
  std::mutex mutex;
  std::condition_variable completed_changed;
  uint64_t recorded = 0;
  uint64_t completed = 0;
  bool alive = true;

  // Blocks (with `lock` held on mutex) until generation `target` has
  // completed or the event is destroyed.
  void WaitFor(std::unique_lock<std::mutex>& lock, uint64_t target) {
    completed_changed.wait(lock, [&] { return completed >= target || !alive; });
  }
};

struct Streams {
  std::mutex mutex;
  std::set<Stream*> live;
  std::set<Event*> events;  // never freed: a stale handle stays detectable
};

Streams& GetStreams() {
  static Streams* streams = new Streams;
  return *streams;
}

// Every task waits this long before it runs, so reads that race the stream fail.
void LaunchDelay() {
  int delay_ms = std::atoi(GetEnv("CANN_DOUBLE_LAUNCH_DELAY_MS").c_str());
  if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
}

int RunTask(StreamTask& task, std::string* message) {
  try {
    return task(message);
  } catch (const std::exception& error) {
    *message = std::string("stream task threw: ") + error.what();
  } catch (...) {
    *message = "stream task threw";
  }
  return kRtErrAicoreException;
}

void WorkerLoop(Stream* stream) {
  SetCurrentContextForThread(stream->context);
  std::unique_lock<std::mutex> lock(stream->mutex);
  for (;;) {
    stream->work_ready.wait(lock, [&] { return !stream->queue.empty() || stream->stopping; });
    if (stream->queue.empty()) return;
    StreamTask task = std::move(stream->queue.front());
    stream->queue.pop_front();
    lock.unlock();
    LaunchDelay();
    std::string message;
    int status = RunTask(task, &message);
    task = nullptr;  // release what the task holds before reporting completion
    lock.lock();
    if (status != kAclSuccess && stream->error == kAclSuccess) {
      stream->error = status;
      stream->error_message = message;
    }
    ++stream->completed;
    stream->progress.notify_all();
  }
}

Stream* LiveStream(aclrtStream handle) {
  Streams& streams = GetStreams();
  std::lock_guard<std::mutex> lock(streams.mutex);
  auto* stream = static_cast<Stream*>(handle);
  return streams.live.count(stream) ? stream : nullptr;
}

Event* LiveEvent(aclrtEvent handle) {
  Streams& streams = GetStreams();
  std::lock_guard<std::mutex> lock(streams.mutex);
  auto* event = static_cast<Event*>(handle);
  return streams.events.count(event) && event->alive ? event : nullptr;
}

Stream* NewStream(Context* context) {
  auto* stream = new Stream;
  stream->context = context;
  stream->device = context->device;
  stream->worker = std::thread(WorkerLoop, stream);
  Streams& streams = GetStreams();
  std::lock_guard<std::mutex> lock(streams.mutex);
  streams.live.insert(stream);
  return stream;
}

// The current context's default stream (the nullptr stream), made on first use.
Stream* DefaultStream() {
  static std::mutex mutex;
  Context* context = CurrentContext();
  if (context == nullptr || !context->alive) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (context->default_stream == nullptr) context->default_stream = NewStream(context);
  return static_cast<Stream*>(context->default_stream);
}

// Waits until `stream` has run everything submitted so far; false on timeout.
bool WaitIdle(Stream* stream, std::unique_lock<std::mutex>& lock, int32_t timeout_ms) {
  uint64_t target = stream->submitted;
  auto done = [&] { return stream->completed >= target; };
  if (timeout_ms <= 0) {
    stream->progress.wait(lock, done);
    return true;
  }
  return stream->progress.wait_for(lock, std::chrono::milliseconds(timeout_ms), done);
}

}  // namespace

aclError Enqueue(const char* fn, aclrtStream handle, StreamTask task) {
  Stream* stream = handle ? LiveStream(handle) : DefaultStream();
  if (stream == nullptr) {
    SetRecentError(std::string(fn) + ": " +
                   (handle ? "not a live stream" : "no current context for the default stream"));
    return handle ? kRtErrParamInvalid : kRtErrContextNull;
  }
  int device = CurrentDevice();
  if (device != stream->device) {
    SetRecentError(std::string(fn) + ": the stream belongs to device " +
                   std::to_string(stream->device) + " but the current device is " +
                   std::to_string(device));
    return device < 0 ? kRtErrContextNull : kRtErrStreamContext;
  }
  std::lock_guard<std::mutex> lock(stream->mutex);
  stream->queue.push_back(std::move(task));
  ++stream->submitted;
  stream->work_ready.notify_one();
  return kAclSuccess;
}

int StreamDevice(aclrtStream handle) {
  Stream* stream = handle ? LiveStream(handle) : DefaultStream();
  return stream ? stream->device : -1;
}

namespace rt {

aclError CreateStream(aclrtStream* handle) {
  if (handle == nullptr) return kRtErrParamInvalid;
  Context* context = CurrentContext();
  if (context == nullptr || !context->alive) {
    SetRecentError("aclrtCreateStream: no current context (call aclrtSetDevice first)");
    return kRtErrContextNull;
  }
  *handle = NewStream(context);
  return kAclSuccess;
}

aclError DestroyStream(aclrtStream handle) {
  Stream* stream = LiveStream(handle);
  if (stream == nullptr) {
    SetRecentError("aclrtDestroyStream: not a live stream");
    return kRtErrParamInvalid;
  }
  {
    Streams& streams = GetStreams();
    std::lock_guard<std::mutex> lock(streams.mutex);
    streams.live.erase(stream);
  }
  {
    std::lock_guard<std::mutex> lock(stream->mutex);
    stream->stopping = true;
    stream->work_ready.notify_one();
  }
  stream->worker.join();  // runs what is queued first, as ACL does
  if (stream->context->default_stream == stream) stream->context->default_stream = nullptr;
  delete stream;
  return kAclSuccess;
}

aclError SynchronizeStream(aclrtStream handle, int32_t timeout_ms) {
  if (timeout_ms < -1) return kRtErrParamInvalid;
  Stream* stream = handle ? LiveStream(handle) : DefaultStream();
  if (stream == nullptr) {
    SetRecentError("aclrtSynchronizeStream: not a live stream");
    return handle ? kRtErrParamInvalid : kRtErrContextNull;
  }
  std::unique_lock<std::mutex> lock(stream->mutex);
  if (!WaitIdle(stream, lock, timeout_ms)) {
    SetRecentError("aclrtSynchronizeStreamWithTimeout: stream not done after " +
                   std::to_string(timeout_ms) + " ms (" +
                   std::to_string(stream->submitted - stream->completed) + " tasks pending)");
    return kRtErrStreamSyncTimeout;
  }
  int error = stream->error;
  if (error != kAclSuccess) {
    SetRecentError(stream->error_message);
    stream->error = kAclSuccess;
    stream->error_message.clear();
  }
  return error;
}

aclError SynchronizeDevice() {
  int device = CurrentDevice();
  if (device < 0) return kRtErrContextNull;
  std::vector<Stream*> on_device;
  {
    Streams& streams = GetStreams();
    std::lock_guard<std::mutex> lock(streams.mutex);
    for (Stream* stream : streams.live) {
      if (stream->device == device) on_device.push_back(stream);
    }
  }
  aclError first_error = kAclSuccess;
  for (Stream* stream : on_device) {
    aclError error = SynchronizeStream(stream, -1);
    if (first_error == kAclSuccess) first_error = error;
  }
  return first_error;
}

aclError CreateEvent(aclrtEvent* handle) {
  if (handle == nullptr) return kRtErrParamInvalid;
  auto* event = new Event;
  Streams& streams = GetStreams();
  std::lock_guard<std::mutex> lock(streams.mutex);
  streams.events.insert(event);
  *handle = event;
  return kAclSuccess;
}

aclError DestroyEvent(aclrtEvent handle) {
  Event* event = LiveEvent(handle);
  if (event == nullptr) {
    SetRecentError("aclrtDestroyEvent: not a live event");
    return kRtErrParamInvalid;
  }
  std::lock_guard<std::mutex> lock(event->mutex);
  event->alive = false;
  event->completed_changed.notify_all();  // stream waits on it give up
  return kAclSuccess;
}

aclError RecordEvent(aclrtEvent handle, aclrtStream stream) {
  Event* event = LiveEvent(handle);
  if (event == nullptr) return kRtErrParamInvalid;
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    generation = ++event->recorded;
  }
  return Enqueue("aclrtRecordEvent", stream, [event, generation](std::string*) {
    std::lock_guard<std::mutex> lock(event->mutex);
    if (generation > event->completed) event->completed = generation;
    event->completed_changed.notify_all();
    return kAclSuccess;
  });
}

aclError StreamWaitEvent(aclrtStream stream, aclrtEvent handle) {
  Event* event = LiveEvent(handle);
  if (event == nullptr) return kRtErrParamInvalid;
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    target = event->recorded;
  }
  return Enqueue("aclrtStreamWaitEvent", stream, [event, target](std::string*) {
    std::unique_lock<std::mutex> lock(event->mutex);
    event->WaitFor(lock, target);
    return kAclSuccess;
  });
}

aclError SynchronizeEvent(aclrtEvent handle) {
  Event* event = LiveEvent(handle);
  if (event == nullptr) return kRtErrParamInvalid;
  std::unique_lock<std::mutex> lock(event->mutex);
  event->WaitFor(lock, event->recorded);
  return kAclSuccess;
}

}  // namespace rt
}  // namespace cann_double
