package serve

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the server's Prometheus series, on a registry of their own so
// several servers can live in one process (tests).
type metrics struct {
	reg *prometheus.Registry

	requests         *prometheus.CounterVec // adapter, endpoint, status
	promptTokens     *prometheus.CounterVec // adapter
	generationTokens *prometheus.CounterVec // adapter
	ttft             prometheus.Histogram
	itl              prometheus.Histogram
	batchSequences   prometheus.Histogram
	batchTokens      prometheus.Histogram
	stepSeconds      prometheus.Histogram
	queueDepth       prometheus.Gauge
	activeSequences  prometheus.Gauge
	residentAdapters prometheus.Gauge
	registered       prometheus.Gauge
	adapterLoads     prometheus.Counter
	adapterEvictions prometheus.Counter
	adapterLoadSecs  prometheus.Histogram
	kvUsed           prometheus.Gauge
	kvCapacity       prometheus.Gauge
	slotsTotal       prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	latency := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sbora_requests_total",
		Help: "Completed inference requests by adapter (model name), endpoint and status."}, []string{"adapter", "endpoint", "status"})
	m.promptTokens = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sbora_prompt_tokens_total",
		Help: "Prompt tokens processed, by adapter."}, []string{"adapter"})
	m.generationTokens = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sbora_generation_tokens_total",
		Help: "Tokens generated, by adapter."}, []string{"adapter"})
	m.ttft = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_time_to_first_token_seconds",
		Help: "Time from request arrival to its first generated token.", Buckets: latency})
	m.itl = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_inter_token_latency_seconds",
		Help: "Time between consecutive generated tokens of a request.", Buckets: latency})
	m.batchSequences = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_batch_sequences",
		Help: "Sequences per engine step.", Buckets: prometheus.ExponentialBuckets(1, 2, 9)})
	m.batchTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_batch_tokens",
		Help: "Tokens per engine step.", Buckets: prometheus.ExponentialBuckets(1, 2, 12)})
	m.stepSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_step_seconds",
		Help: "Duration of one engine step.", Buckets: latency})
	m.queueDepth = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_queue_depth",
		Help: "Requests waiting for a KV slot or their adapters."})
	m.activeSequences = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_active_sequences",
		Help: "Sequences holding a KV slot."})
	m.slotsTotal = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_slots",
		Help: "KV slots (concurrent sequences) the server has."})
	m.residentAdapters = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_resident_adapters",
		Help: "Adapters loaded in engine memory."})
	m.registered = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_registered_adapters",
		Help: "Adapters registered (resident or not)."})
	m.adapterLoads = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_adapter_loads_total",
		Help: "Adapters made resident."})
	m.adapterEvictions = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_adapter_evictions_total",
		Help: "Resident adapters evicted to make room (least recently used first)."})
	m.adapterLoadSecs = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_adapter_load_seconds",
		Help: "Time to make an adapter resident: read, validate and upload.", Buckets: latency})
	m.kvUsed = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_cache_used_tokens",
		Help: "KV cache positions holding tokens of active sequences."})
	m.kvCapacity = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_cache_capacity_tokens",
		Help: "KV cache positions in all slots."})
	m.reg.MustRegister(m.requests, m.promptTokens, m.generationTokens, m.ttft, m.itl, m.batchSequences,
		m.batchTokens, m.stepSeconds, m.queueDepth, m.activeSequences, m.slotsTotal, m.residentAdapters, m.registered,
		m.adapterLoads, m.adapterEvictions, m.adapterLoadSecs, m.kvUsed, m.kvCapacity,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
