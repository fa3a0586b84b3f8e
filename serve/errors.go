package serve

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/sbora-serve/sbora-serve/adapters"
)

// apiError is an error with its HTTP status and OpenAI error fields.
type apiError struct {
	Status  int
	Message string
	Type    string
	Param   string
	Code    string
}

func (e *apiError) Error() string { return e.Message }

func errBadRequest(param, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf(format, args...), Type: "invalid_request_error", Param: param}
}

func errNotFound(code, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf(format, args...), Type: "invalid_request_error", Code: code}
}

var (
	errQueueFull = &apiError{Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: "rate_limit_exceeded",
		Message: "the server's request queue is full; retry later"}
	errShuttingDown = &apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "server_shutting_down",
		Message: "the server is shutting down"}
	errDrainTimeout = &apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "server_shutting_down",
		Message: "the server is shutting down and its drain timeout ended this request; retry on another replica"}
)

// writeError writes err as OpenAI-shaped JSON with the right status.
func writeError(w http.ResponseWriter, err error) {
	e := toAPIError(err)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Status)
	var param, code any
	if e.Param != "" {
		param = e.Param
	}
	if e.Code != "" {
		code = e.Code
	}
	json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{
		"message": e.Message, "type": e.Type, "param": param, "code": code,
	}})
}

func toAPIError(err error) *apiError {
	var e *apiError
	if errors.As(err, &e) {
		return e
	}
	var le *loadError
	if errors.As(err, &le) {
		return &apiError{Status: http.StatusInternalServerError, Message: err.Error(), Type: "server_error", Code: "adapter_load_failed"}
	}
	switch {
	case errors.Is(err, adapters.ErrNotFound):
		return &apiError{Status: http.StatusNotFound, Message: err.Error(), Type: "invalid_request_error", Code: "adapter_not_found"}
	case errors.Is(err, adapters.ErrExists):
		return &apiError{Status: http.StatusConflict, Message: err.Error(), Type: "invalid_request_error", Code: "adapter_exists"}
	case errors.Is(err, adapters.ErrBadName):
		return &apiError{Status: http.StatusBadRequest, Message: err.Error(), Type: "invalid_request_error", Param: "name"}
	case errors.Is(err, adapters.ErrBadPath):
		return &apiError{Status: http.StatusForbidden, Message: err.Error(), Type: "permission_error", Param: "path"}
	case errors.Is(err, adapters.ErrInvalid):
		return &apiError{Status: http.StatusBadRequest, Message: err.Error(), Type: "invalid_request_error", Code: "invalid_adapter"}
	}
	var me *http.MaxBytesError
	if errors.As(err, &me) {
		return &apiError{Status: http.StatusRequestEntityTooLarge, Message: fmt.Sprintf("request body larger than %d bytes", me.Limit), Type: "invalid_request_error"}
	}
	return &apiError{Status: http.StatusInternalServerError, Message: err.Error(), Type: "server_error"}
}
